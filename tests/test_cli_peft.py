"""`sparsepeft train --method lora|dora|adapter ... [--fish --budget ...]` end to end on a tiny model."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from sparsepeft import SparseMask
from sparsepeft.adapters import load_bottleneck_adapters
from sparsepeft.cli.main import main
from test_cli import FAST

TINY = ["--task", "demo", "--max-train-samples", "48", "--max-eval-samples", "24", "--num-samples", "32",
        "--learning-rate", "1e-2", *FAST]


def _results(out):
    return json.loads((out / "results.json").read_text())


def _dev_loss(model, tiny_bert_dir) -> float:
    """Mean cross-entropy of ``model`` on the dev rows the CLI evaluated (demo, 24 rows drawn with seed 42)."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from sparsepeft.experiments.pipeline import featurize, load_task_data

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    _, evaluation = featurize(load_task_data("demo"), tokenizer, 48, 48, 24, 42)
    batch = DataCollatorWithPadding(tokenizer)(evaluation["validation"])
    with torch.no_grad():
        return float(model.eval()(**batch).loss)




def test_lora_fish_at_the_budget_of_a_smaller_rank_saves_a_peft_adapter(tiny_bert_dir, tmp_path):
    vanilla, fish = tmp_path / "lora4", tmp_path / "lora8-fish"
    common = ["--model", str(tiny_bert_dir), "--target-modules", "query,value", *TINY]
    assert main(["train", "--method", "lora", "--lora-r", "4", "--output-dir", str(vanilla), *common]) == 0
    assert main(["train", "--method", "lora", "--lora-r", "8", "--fish", "--budget", "lora:r=4",
                 "--fisher-warmup-steps", "3", "--output-dir", str(fish), *common]) == 0
    plain, masked = _results(vanilla), _results(fish)
    assert masked["trainable_params"] == plain["trainable_params"] == plain["peft_params"]  # equal budget, exactly
    assert masked["peft_params"] > masked["trainable_params"] and masked["budget"] == "lora:r=4"
    mask = SparseMask.load(fish / "sparse_mask.safetensors")
    assert mask.num_selected == plain["trainable_params"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    untrained = _dev_loss(base, tiny_bert_dir)
    loaded = PeftModel.from_pretrained(base, fish)  # PEFT's own format and loader
    # the reloaded adapter is the trained one: it reproduces the dev loss the run reported, which differs from
    # the base model's own
    assert _dev_loss(loaded, tiny_bert_dir) == pytest.approx(masked["metrics"]["validation"]["loss"], rel=1e-5)
    assert abs(untrained - masked["metrics"]["validation"]["loss"]) > 1e-3
    mask.check_compatible(loaded)  # the mask beside the adapter fits the reloaded PEFT model


@pytest.mark.parametrize("method,selection", [("dora", "lowest"), ("houlsby", "random"), ("parallel", "fisher")])
def test_other_methods_and_selections_run_end_to_end(tiny_bert_dir, tmp_path, method, selection):
    out = tmp_path / method
    assert main(["train", "--model", str(tiny_bert_dir), "--method", method, "--fish", "--budget", "60%",
                 "--selection", selection, "--bottleneck-size", "4", "--lora-r", "4", "--fisher-warmup-steps", "2",
                 "--output-dir", str(out), *TINY]) == 0
    results = _results(out)
    assert results["selection"] == selection and results["trainable_params"] == round(0.6 * results["peft_params"])
    if method in ("houlsby", "parallel"):
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
        untrained = _dev_loss(base, tiny_bert_dir)
        model = load_bottleneck_adapters(base, out)
        assert _dev_loss(model, tiny_bert_dir) == pytest.approx(results["metrics"]["validation"]["loss"], rel=1e-5)
        assert abs(untrained - results["metrics"]["validation"]["loss"]) > 1e-3


def test_peft_flags_that_cannot_work_are_clear_errors(tiny_bert_dir, tmp_path, capsys):
    common = ["--model", str(tiny_bert_dir), *TINY]
    assert main(["train", "--method", "fish", "--fish", "--output-dir", str(tmp_path / "a"), *common]) == 2
    assert "--fish masks inside a PEFT method" in capsys.readouterr().err
    assert main(["train", "--method", "lora", "--lora-r", "2", "--fish", "--budget", "lora:r=8",
                 "--output-dir", str(tmp_path / "b"), *common]) == 2
    assert "larger than the" in capsys.readouterr().err
    assert main(["train", "--method", "lora", "--target-modules", "nope", "--output-dir", str(tmp_path / "c"),
                 *common]) == 2
    assert "match no layer" in capsys.readouterr().err
