"""Every subcommand's --help prints its flags and exits 0 (argparse formats help strings with %)."""

import pytest
import torch

from sparsepeft.cli.main import main

FLAGS = {"train": ["--method", "--keep-ratio", "--budget", "--learning-rate", "--layers", "--split-seed", "--shira-r",
                   "--ist-probe-chunk-size"],
         "mask": ["--method", "--keep-ratio", "--selection"],
         "merge": ["--model", "--delta", "--output-dir"],
         "export-shira": ["--model", "--delta", "--output-dir"],
         "demo": ["--output-dir"]}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_prints_every_flag(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for flag in FLAGS[command]:
        assert flag.replace("-", "_")[2:] in out.replace("-", "_"), f"{command} --help does not list {flag}"


def test_help_states_the_default_learning_rates(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ("full 5e-05, fish 0.001, random entries (--method random, or fish with --selection random) 0.01, "
            "lora 0.001, other PEFT methods 0.001, shira 0.003 (0.01 with --selection random)") in out
    assert "SST-2 and STS-B (two seeds) and SmolLM2 on social_iqa" in out  # which tasks LoRA's rate comes from
    from sparsepeft.cli.arguments import SparseArguments

    assert SparseArguments(method="shira").default_learning_rate == 3e-3
    assert SparseArguments(method="shira", selection="random").default_learning_rate == 1e-2  # PEFT's own SHiRA
    assert SparseArguments(method="lora").default_learning_rate == 1e-3
    assert SparseArguments(method="dora").default_learning_rate == SparseArguments(method="houlsby").default_learning_rate == 1e-3
    assert SparseArguments(method="fish").default_learning_rate == 1e-3  # was 2e-3, until CoLA (docs/selection.md)
    # random entries have their own ladder's rate (at 2e-3 they lost 5 points on SST-2), however asked for
    assert SparseArguments(method="random").default_learning_rate == 1e-2
    assert SparseArguments(method="fish", selection="random").default_learning_rate == 1e-2
    assert SparseArguments(method="fish", selection="lowest").default_learning_rate == 1e-3
    assert SparseArguments(method="full").default_learning_rate == 5e-5


@pytest.mark.parametrize("model", ["/no/such/folder", "not a hub id!"])
def test_a_missing_model_folder_is_a_clear_error(model, tmp_path, capsys):
    assert main(["train", "--model", model, "--task", "demo", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no such local folder, and not a valid hub id" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def _headless_bert(folder):
    """A tiny BERT saved without a task head: loading it for classification initialises a new head."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from conftest import WORDS

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def test_a_run_prints_its_own_lines_not_third_party_reports(tmp_path):
    """One line says the head is new; no LOAD REPORT table, no pin_memory warning on CPU, no traceback.
    Runs as a user runs it (a new process), so logging is configured as the CLI configures it."""
    import json
    import os
    import subprocess
    import sys

    model = _headless_bert(tmp_path / "model")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "sparsepeft", "train", "--model", str(model), "--task", "demo",
                          "--method", "fish", "--keep-ratio", "0.05", "--max-train-samples", "16", "--max-eval-samples", "8", "--max-steps",
                          "1", "--num-samples", "8", "--save-strategy", "no", "--report-to", "none", "--output-dir",
                          str(out)], capture_output=True, text=True, env=env, timeout=240)
    text = run.stdout + run.stderr
    assert run.returncode == 0, text
    assert text.count("New task head for 2 label(s): classifier.bias, classifier.weight") == 1
    for noise in ("LOAD REPORT", "pin_memory", "Traceback", "font cache"):
        assert noise not in text, f"{noise!r} in the output:\n{text}"
    results = json.loads((out / "results.json").read_text())
    assert results["learning_rate"] == 1e-3 and results["learning_rate_source"] == "method default"


def test_the_sparse_engine_is_the_default_where_it_applies():
    from sparsepeft.cli.arguments import SparseArguments

    assert SparseArguments(method="fish").engine == SparseArguments(method="random").engine == "sparse"
    assert SparseArguments(method="lora").engine == "dense-mask"  # FISH-Tuning trains the adapter's own tensors
    assert SparseArguments(method="fish", engine="dense-mask").engine == "dense-mask"


def test_ist_probe_chunk_size_reaches_the_config_and_is_kept():
    from sparsepeft.cli.arguments import LayerwiseArguments

    assert LayerwiseArguments(layers="ist", ist_probe_chunk_size=3).config(0).probe_chunk_size == 3
    assert LayerwiseArguments(layers="ist").config(0).probe_chunk_size is None  # the callback uses the batch


def test_the_fisher_batch_plan_fits_the_training_step_or_says_by_how_much_it_does_not(monkeypatch):
    from conftest import make_examples, make_model

    from sparsepeft.importance import memory

    monkeypatch.setattr(memory, "SELECTION_TEMPORARY_BYTES", 0)  # a tiny model: the selection's chunk would dominate

    from sparsepeft.data.collate import PaddingCollator
    from sparsepeft.importance.memory import plan_fisher_batch, saved_activation_bytes

    model = make_model("bert")
    examples = make_examples(64, lengths=(3, 6))  # short: the accumulator outweighs a few samples' activations
    collate = PaddingCollator(0)
    scored = dict(model.named_parameters())
    per_sample = saved_activation_bytes(model, collate(examples[:1]))
    assert per_sample > 0 and saved_activation_bytes(model, collate(examples[:2])) > per_sample  # grows with the batch
    plans = {}
    for train_batch in (1, 2, 4, 8, 64):
        plan = plan_fisher_batch(model, examples, collate, train_batch, scored)
        plans[train_batch] = plan
        # the budget is the input-gradient path alone: no more than a step in which every weight trains
        assert 0 < plan.budget_bytes <= train_batch * plan.train_activation_bytes_per_sample
        need = plan.batch_size * plan.fisher_activation_bytes_per_sample + plan.largest_group_bytes + plan.per_layer_work_bytes
        assert 1 <= plan.batch_size <= train_batch
        assert (need <= plan.budget_bytes) == plan.fits
        covered = {}
        for group in plan.groups:  # every scored tensor once, whole or in consecutive row ranges
            for name, rows in group:
                whole = scored[name].shape[0] if scored[name].dim() else 1
                first, stop = rows if rows is not None else (0, whole)
                assert covered.get(name, 0) == first
                covered[name] = stop
        assert list(covered) == list(scored)
        assert all(covered[n] == (p.shape[0] if p.dim() else 1) for n, p in scored.items())
        if not plan.fits:
            assert plan.batch_size == 1 and plan.excess_bytes == need - plan.budget_bytes
    assert len(plans[64].groups) == 1 and plans[64].batch_size > 1  # a large training step: one pass
    counts = [len(plans[b].groups) for b in sorted(plans)]
    assert counts == sorted(counts, reverse=True)  # the smaller the training step, the more Fisher passes
    # where the accumulator does not fit beside the activations, it is measured in groups within the step
    assert any(len(plan.groups) > 1 and plan.fits for plan in plans.values())
    assert any(plan.fits and any(rows is not None for group in plan.groups for _, rows in group)
               for plan in plans.values())  # a tensor too large for one pass is measured in row ranges
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_the_cli_mask_phase_runs_on_the_training_device(tiny_bert_dir, tmp_path, monkeypatch):
    """The Fisher pass sees the model on the device TrainingArguments resolves to (meta stands in for a GPU)."""
    from transformers import TrainingArguments

    from sparsepeft.importance import scores

    seen = []

    class Stop(Exception):
        pass

    def record(model, *args, **kwargs):
        seen.append(next(model.parameters()).device)
        raise Stop

    monkeypatch.setattr(TrainingArguments, "device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(scores, "estimate_fisher", record)
    with pytest.raises(Stop):
        main(["mask", "--model", str(tiny_bert_dir), "--task", "demo", "--max-train-samples", "16",
              "--num-samples", "8", "--fisher-batch-size", "4", "--output-dir", str(tmp_path / "m"),
              "--report-to", "none"])
    assert seen == [torch.device("meta")]


def test_each_command_has_its_own_usage_and_an_argument_error_is_one_short_message(capsys):
    with pytest.raises(SystemExit):
        main(["mask", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: sparsepeft mask")
    lines = out.splitlines()
    assert lines[1] == ""  # a one-line usage, not every flag of TrainingArguments in it
    assert lines.index("sparsepeft: model:") < lines.index("transformers TrainingArguments:")  # ours first
    assert "not Trainer's 5e-05" in out and "(default: 5e-05)" not in out  # the rate a run really gets is explained
    with pytest.raises(SystemExit) as stop:
        main(["train", "--keep-ratio", "abc", "--output-dir", "x"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "sparsepeft train: error:" in err and "--keep-ratio" in err and len(err.strip().splitlines()) <= 3


def test_saves_get_the_usual_file_mode_and_clean_up_a_killed_saves_leftovers(tmp_path):
    import os

    from sparsepeft.utils.io import write_json

    (tmp_path / ".results.json.abc123.tmp").write_bytes(b"x" * 1000)  # what kill -9 mid-save leaves
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "results.json").st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_saved_activation_bytes_counts_each_saved_storage_once_and_no_weight():
    from torch import nn

    from sparsepeft.importance.memory import saved_activation_bytes

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.second(torch.relu(self.first(x)))

    model = Tiny()
    x = torch.randn(2, 8)
    # first saves its input x (2x8), relu saves its output (2x16), which second saves again: counted once
    assert saved_activation_bytes(model, {"x": x}) == 4 * (2 * 8 + 2 * 16)
    model.first.weight.requires_grad_(False)
    model.first.bias.requires_grad_(False)  # nothing below relu trains: x need not be kept
    assert saved_activation_bytes(model, {"x": x}) == 4 * (2 * 16)


def test_the_plan_counts_the_selection_chunk_it_is_given():
    from sparsepeft.importance.memory import SELECTION_TEMPORARY_BYTES
    from sparsepeft.selection.topk import CHUNK

    assert SELECTION_TEMPORARY_BYTES == 24 * CHUNK


def test_a_run_shows_progress_and_logs_its_loss_twenty_times_unless_told_otherwise():
    from sparsepeft.cli.main import _parse

    args = _parse(["--output-dir", "x"])[-1]
    assert args.disable_tqdm is False and args.logging_steps == 0.05  # not one loss line per 500 steps
    args = _parse(["--output-dir", "x", "--disable-tqdm", "true", "--logging-steps", "7"])[-1]
    assert args.disable_tqdm is True and args.logging_steps == 7


def test_an_unknown_task_points_at_data_dir_for_big_bench():
    from sparsepeft.data.tasks import glue_task

    with pytest.raises(ValueError, match=r"--data-dir DIR with DIR/NAME/task.json"):
        glue_task("social_iqa")
