"""sparsepeft's callbacks inside TRL's SFTTrainer, the trainer most decoder fine-tuning scripts use."""

import json

import pytest
import torch

from conftest import assert_only_mask_moved, random_score_mask
from sparsepeft import LayerwiseCallback, LayerwiseConfig, SparseMaskCallback

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[test]' installs it)")
from datasets import Dataset  # noqa: E402  (a TRL dependency)


def _sft(model_dir, out, callbacks, model=None, steps=6, per_device_train_batch_size=4, **config):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = "good bad great film movie dog cat price".split()
    rows = [{"prompt": f"the {words[i % 8]} is", "completion": f" {words[(i * 3) % 8]}"} for i in range(32)]
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=per_device_train_batch_size, learning_rate=1e-2,
                     report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=1,
                     max_length=32, seed=0, dataloader_pin_memory=False, **config)
    model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=callbacks)
    trainer.train()
    return trainer


@pytest.mark.parametrize("engine", ["dense-mask", "sparse"])
def test_a_fish_mask_inside_sft_trainer_moves_only_its_entries(tiny_llama_lm_dir, tmp_path, engine):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_lm_dir)
    mask = random_score_mask(model, 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _sft(tiny_llama_lm_dir, tmp_path, [SparseMaskCallback(mask, engine=engine)], model=model)
    assert trainer.state.global_step == 6
    assert_only_mask_moved(before, model, mask, min_moved_fraction=0.3)


def test_ist_inside_sft_trainer_logs_its_selections(tiny_llama_lm_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_lm_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    callback = LayerwiseCallback(LayerwiseConfig("ist", fraction=0.5, probe_interval=2, probe_batch_size=4))
    _sft(tiny_llama_lm_dir, tmp_path, [callback], model=model, steps=8)
    history = json.loads((tmp_path / "layerwise_history.json").read_text())
    assert len(history["selections"]) == 8 and all(len(s) == 2 for s in history["selections"])  # 4 blocks x 0.5
    scores = history["scores"]
    assert len({round(v, 12) for v in scores.values()}) > 1  # the probes moved the scores apart
    trained_blocks = {b for s in history["selections"] for b in s}
    for name, value in model.named_parameters():
        if "lora_B" in name:
            block = int(name.split("layers.")[1].split(".")[0])
            moved = not torch.equal(value.detach(), lora_b[name])
            assert moved == (block in trained_blocks), name  # a block's LoRA moves iff it was ever selected


@pytest.fixture(scope="module")
def smollm2_dir():
    from sparsepeft.models.catalog import resolve_model

    try:
        return resolve_model("smollm2-135m")
    except (ImportError, ValueError, FileNotFoundError) as error:
        pytest.skip(f"SmolLM2-135M is not installed here ({str(error).splitlines()[0]})")


def test_ist_and_a_mask_inside_sft_trainer_on_smollm2(smollm2_dir, tmp_path):
    """The LLM track's model (30 blocks, tied embeddings): IST picks int(0.25 * 30) = 7 blocks a step, and a
    sparse-engine mask moves only its entries."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    callback = LayerwiseCallback(LayerwiseConfig("ist", probe_interval=2, probe_batch_size=2))
    _sft(smollm2_dir, tmp_path / "ist", [callback], model=model, steps=3, per_device_train_batch_size=2)
    history = json.loads((tmp_path / "ist" / "layerwise_history.json").read_text())
    assert [len(s) for s in history["selections"]] == [7, 7, 7] and len(history["scores"]) == 30

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    mask = random_score_mask(model, 0.001)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _sft(smollm2_dir, tmp_path / "mask", [SparseMaskCallback(mask, engine="sparse")], model=model, steps=2,
         per_device_train_batch_size=2)
    assert_only_mask_moved(before, model, mask, min_moved_fraction=0.3)
