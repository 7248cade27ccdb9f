"""`sparsepeft train --layers ...` on classifiers and on a causal LM trained from prompt/response files."""

import json

import numpy as np
import pytest
import torch

from conftest import VOCAB, make_model
from sparsepeft.cli.main import main
from sparsepeft.data.causal_lm import exact_match_metrics, tokenize_prompt_response

COMMON = ["--max-seq-length", "32", "--per-device-train-batch-size", "4", "--learning-rate", "1e-2",
          "--report-to", "none", "--save-strategy", "no", "--disable-tqdm", "true", "--use-cpu", "true",
          "--logging-steps", "1", "--seed", "0"]


def _train(model_dir, out, *flags, task=("--task", "demo", "--max-train-samples", "48", "--max-eval-samples", "16")):
    return main(["train", "--model", str(model_dir), *task, *COMMON, "--output-dir", str(out), *flags])


@pytest.mark.parametrize("strategy", ["ist", "lisa", "random", "full"])
def test_cli_trains_lora_layer_wise(tiny_bert4_dir, tmp_path, strategy):
    out = tmp_path / strategy
    flags = ["--method", "lora", "--lora-r", "2", "--layers", strategy, "--num-train-epochs", "2",
             "--ist-probe-interval", "4", "--ist-probe-batch-size", "8"]
    if strategy in ("ist", "random"):
        flags += ["--layers-fraction", "0.5"]
    assert _train(tiny_bert4_dir, out, *flags) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["layers"]["strategy"] == strategy
    history = json.loads((out / "layerwise_history.json").read_text())
    per_step = {"ist": 2, "random": 2, "lisa": 2, "full": 4}[strategy]
    assert len(history["selections"]) == 24 and all(len(s) == per_step for s in history["selections"])
    assert sum(results["layerwise"]["steps_trained_per_block"].values()) == 24 * per_step
    assert (out / "layerwise_heatmap.png").is_file() and (out / "adapter_model.safetensors").is_file()
    # the loss curve (one entry per --logging-steps 1) is kept, and averages to the run's training loss
    curve = results["train_log"]
    assert [entry["step"] for entry in curve] == list(range(1, 25))
    assert np.mean([entry["loss"] for entry in curve]) == pytest.approx(results["train_loss"], abs=1e-3)
    if strategy == "ist":
        assert [p["step"] for p in history["probes"]] == [4, 8, 12, 16, 20]
        assert any(v != 0 for v in results["layerwise"]["final_scores"].values())
        # the probes' wall time is reported beside the training time, as the sum of every probe's own
        assert results["layerwise"]["probes"] == 5 and all(p["seconds"] > 0 for p in history["probes"])
        assert results["layerwise"]["probe_seconds"] == pytest.approx(sum(p["seconds"] for p in history["probes"]))
        assert results["layerwise"]["probe_seconds"] < results["train_seconds"]


def test_cli_composes_layers_with_fish_tuning(tiny_bert4_dir, tmp_path):
    flags = ["--method", "lora", "--lora-r", "4", "--fish", "--budget", "50%", "--fisher-warmup-steps", "2",
             "--num-samples", "16", "--layers", "ist", "--layers-fraction", "0.5", "--ist-probe-interval", "3",
             "--ist-probe-batch-size", "8", "--max-steps", "8", "--layers-optimizer-state", "drop"]
    assert _train(tiny_bert4_dir, tmp_path, *flags) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["fish"] and results["layers"]["optimizer_state"] == "drop"
    assert results["trainable_params"] < results["peft_params"]
    assert (tmp_path / "sparse_mask.safetensors").is_file() and (tmp_path / "layerwise_history.json").is_file()


@pytest.mark.parametrize("flags,message", [
    (["--method", "fish", "--layers", "ist"], "--layers chooses blocks of a PEFT method"),
    (["--method", "lora", "--layers", "ist", "--layers-fraction", "0"], "fraction must be in"),
    (["--method", "lora", "--layers", "random", "--layers-fraction", "0.1"], "selects no block of 4"),
    (["--method", "lora", "--layers", "lisa", "--layers-count", "9"], "model has 4"),
    (["--method", "lora", "--layers", "ist", "--ist-probe-batch-size", "64"], "larger than the 48"),
    (["--method", "full", "--layers", "ist"], "hold no PEFT module"),
])
def test_cli_bad_layer_settings_are_clear_errors(tiny_bert4_dir, tmp_path, capsys, flags, message):
    assert _train(tiny_bert4_dir, tmp_path, "--max-steps", "2", *flags) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- causal LM


def _write_pairs(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))


def _copy_task(tmp_path, n):
    words = "good bad great film movie dog cat price".split()
    rows = [(f"the {words[i % 8]} is", words[(i * 3) % 8]) for i in range(n)]
    _write_pairs(tmp_path / "train.jsonl", rows)
    _write_pairs(tmp_path / "dev.jsonl", rows[:16])
    return ["--task-type", "causal-lm", "--train-file", str(tmp_path / "train.jsonl"),
            "--validation-file", str(tmp_path / "dev.jsonl")]


@pytest.mark.parametrize("flags", [["--method", "lora", "--lora-r", "4"],
                                   ["--method", "lora", "--lora-r", "4", "--layers", "ist", "--layers-fraction", "0.5",
                                    "--ist-probe-interval", "5", "--ist-probe-batch-size", "8"],
                                   ["--method", "lora", "--lora-r", "4", "--layers", "lisa", "--layers-interval", "5"]],
                         ids=["lora", "ist", "lisa"])
def test_cli_trains_a_causal_lm_on_prompt_response_pairs(tiny_llama_lm_dir, tmp_path, flags):
    data = _copy_task(tmp_path, 64)
    assert _train(tiny_llama_lm_dir, tmp_path / "untrained", *flags, "--max-steps", "0", task=data) == 0
    assert _train(tiny_llama_lm_dir, tmp_path / "run", *flags, "--num-train-epochs", "6", "--learning-rate", "1e-1",
                  task=data) == 0
    before = json.loads((tmp_path / "untrained" / "results.json").read_text())["metrics"]["validation"]
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]["validation"]
    assert before["token_accuracy"] < 0.2 and before["exact_match"] == 0.0  # the same model, untrained
    # the copy task is learnt: from no right token to half of them or more (all blocks: some whole answers too)
    assert metrics["loss"] < before["loss"] - 0.1 and metrics["token_accuracy"] >= 0.5
    if "--layers" not in flags:
        assert metrics["exact_match"] >= 0.1


def test_causal_lm_errors(tiny_llama_lm_dir, tmp_path, capsys):
    _write_pairs(tmp_path / "t.jsonl", [("a", "b")] * 4)
    assert _train(tiny_llama_lm_dir, tmp_path / "r", "--method", "lora",
                  task=["--task-type", "causal-lm", "--task", "sst2"]) == 2
    assert "not --task" in capsys.readouterr().err
    assert _train(tiny_llama_lm_dir, tmp_path / "r", "--method", "lora", "--response-column", "answer",
                  task=["--task-type", "causal-lm", "--train-file", str(tmp_path / "t.jsonl"),
                        "--validation-file", str(tmp_path / "t.jsonl")]) == 2
    assert "no ['answer']" in capsys.readouterr().err  # named with the file and row


def test_response_only_labels_and_truncation(tiny_llama_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_lm_dir)
    (example,) = tokenize_prompt_response([("the good movie is", "great film")], tokenizer, max_length=64)
    prompt = tokenizer("the good movie is")["input_ids"]
    response = tokenizer("great film", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"] == prompt + response
    assert example["labels"] == [-100] * len(prompt) + response
    (short,) = tokenize_prompt_response([("the good movie is", "great film")], tokenizer, max_length=5)
    assert short["input_ids"] == prompt[-2:] + response and len(short["input_ids"]) == 5


def test_exact_match_equals_greedy_decoding():
    """Teacher-forced argmax at every response position == greedy generation reproducing the response."""
    model = make_model("llama-lm", layers=2, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    features, expected = [], []
    for i in range(12):
        prompt = torch.randint(3, VOCAB, (5,), generator=g)
        with torch.no_grad():
            greedy = model.generate(prompt[None], max_new_tokens=4, do_sample=False, pad_token_id=0)[0, 5:]
        response = greedy.clone()
        if i % 3 == 0:  # a wrong last token
            response[-1] = (response[-1] + 1 - 3) % (VOCAB - 3) + 3
        if i % 3 == 1:  # a wrong first token
            response[0] = (response[0] + 1 - 3) % (VOCAB - 3) + 3
        ids = torch.cat([prompt, response])
        features.append((ids, torch.cat([torch.full((5,), -100), response])))
        expected.append(i % 3 == 2)
    with torch.no_grad():
        logits = model(torch.stack([f[0] for f in features])).logits
    metrics = exact_match_metrics(logits.argmax(-1).numpy(), torch.stack([f[1] for f in features]).numpy())
    assert metrics["exact_match"] == pytest.approx(np.mean(expected))


def test_mask_command_on_a_causal_lm_pads_its_label_sequences(tiny_llama_lm_dir, tmp_path):
    words = "good bad great film movie dog cat price".split()
    rows = [(" ".join(words[: 1 + i % 5]), " ".join(words[i % 3:])) for i in range(32)]  # lengths vary
    _write_pairs(tmp_path / "train.jsonl", rows)
    _write_pairs(tmp_path / "dev.jsonl", rows[:8])
    data = ["--task-type", "causal-lm", "--train-file", str(tmp_path / "train.jsonl"),
            "--validation-file", str(tmp_path / "dev.jsonl")]
    code = main(["mask", "--model", str(tiny_llama_lm_dir), *data, "--method", "lora", "--lora-r", "4", "--fish",
                 "--budget", "50%", "--fisher-warmup-steps", "2", "--num-samples", "16", "--max-seq-length", "32",
                 "--report-to", "none", "--use-cpu", "true", "--output-dir", str(tmp_path / "mask")])
    assert code == 0
    summary = json.loads((tmp_path / "mask" / "mask_summary.json").read_text())
    assert summary["num_selected"] > 0


def test_a_causal_lm_sparse_delta_merges_into_a_causal_lm_checkpoint(tiny_llama_lm_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = _copy_task(tmp_path, 32)
    out = tmp_path / "run"
    assert _train(tiny_llama_lm_dir, out, "--method", "fish", "--engine", "sparse", "--keep-ratio", "0.05",
                  "--num-samples", "16", "--max-steps", "6", task=data) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_llama_lm_dir), "--delta", str(out / "sparse_delta.safetensors"),
                 "--output-dir", str(merged)]) == 0
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert type(model).__name__ == "LlamaForCausalLM"
    trained = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_llama_lm_dir / "model.safetensors"))
    state = model.state_dict()
    for name, value in trained.items():
        assert torch.equal(state[name], value), name  # the merged checkpoint is the trained model, bit for bit
    assert any(not torch.equal(trained[n], base[n]) for n in base)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model(input_ids=ids).logits,
                               AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_a_masks_embedding_rows_are_reported_with_their_tokens(tmp_path, tied):
    """`sparsepeft mask` and `train` say which vocabulary rows a mask trains, and whether the output head is the
    same matrix (then those rows are the tokens' logits too)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conftest import _save_tiny
    from sparsepeft.selection import SparseMask

    model_dir = _save_tiny(tmp_path / "model", LlamaForCausalLM, LlamaConfig, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, bos_token_id=2,
                           eos_token_id=3, tie_word_embeddings=tied)
    data = _copy_task(tmp_path, 32)
    mask_flags = ["--method", "fish", "--keep-ratio", "0.2", "--num-samples", "16", "--always-train", ""]
    assert main(["mask", "--model", str(model_dir), *data, *COMMON, "--output-dir", str(tmp_path / "mask"),
                 *mask_flags]) == 0
    report = json.loads((tmp_path / "mask" / "mask_summary.json").read_text())["embedding_rows"]
    mask = SparseMask.load(tmp_path / "mask" / "sparse_mask.safetensors")
    name = "model.embed_tokens.weight"
    kept = mask.dense(name)
    assert report["tensor"] == name and report["tied_to_output_head"] is tied
    assert report["kept"] == int(kept.sum()) > 0 and report["rows_with_entries"] == int(kept.any(1).sum())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for row in report["top_rows"]:
        assert row["kept"] == int(kept[row["row"]].sum()) and row["token"] == tokenizer.decode([row["row"]])
    assert _train(model_dir, tmp_path / "run", *mask_flags, "--max-steps", "1", task=data) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["mask_embedding_rows"] == report  # the same mask (same seed and samples), the same report
