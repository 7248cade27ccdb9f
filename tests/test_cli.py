"""`sparsepeft train|mask` end to end on a tiny model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sparsepeft import SparseMask
from sparsepeft.cli.main import main

FAST = ["--num-train-epochs", "1", "--per-device-train-batch-size", "8", "--report-to", "none",
        "--disable-tqdm", "true", "--save-strategy", "no", "--use-cpu", "true", "--max-seq-length", "48",
        "--dataloader-pin-memory", "false"]


def _results(out):
    return json.loads((out / "results.json").read_text())


def _write_glue_task(root, folder: str, header: str, row, n_train: int = 48, n_dev: int = 40):
    """A few rows in GLUE's layout (``root/FOLDER/train.tsv``, ``dev.tsv``), so the test needs no ../shared."""
    (root / folder).mkdir(parents=True)
    for name, n, offset in (("train.tsv", n_train, 0), ("dev.tsv", n_dev, 1000)):
        lines = [header] + ["\t".join(map(str, row(i + offset))) for i in range(n)]
        (root / folder / name).write_text("\n".join(lines) + "\n")
    return root


def _sentence(i: int) -> str:
    from conftest import WORDS

    words = WORDS
    return " ".join(words[(i * k + 3) % len(words)] for k in range(1, 6))


def _saved_model_outputs(out, glue_root, task: str, n_dev: int, max_length: int = 48):
    """The saved model's predictions on the dev rows, recomputed here from the files: what results.json must report."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsepeft.data import load_glue

    split = load_glue(task, glue_root).evaluation["validation"]
    assert len(split) == n_dev
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(*map(list, zip(*split.texts)), truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(out).eval()(**batch).logits.double()
    return logits, torch.tensor(split.labels, dtype=torch.float64)


def test_train_fish_on_glue_writes_model_mask_results_and_keeps_frozen_weights(tiny_bert_dir, tmp_path):
    labels = ("entailment", "not_entailment")
    glue = _write_glue_task(tmp_path / "glue", "RTE", "index\tsentence1\tsentence2\tlabel",
                            lambda i: (i, _sentence(i), _sentence(i + 7), labels[(i * 7) % 3 == 0]))
    out = tmp_path / "fish"
    code = main(["train", "--model", str(tiny_bert_dir), "--task", "rte", "--data-dir", str(glue),
                 "--max-train-samples", "48", "--max-eval-samples", "40", "--num-samples", "32",
                 "--keep-ratio", "0.05", "--learning-rate", "1e-2", "--weight-decay", "0.1", "--output-dir", str(out),
                 *FAST])
    assert code == 0
    results = _results(out)
    assert results["task"] == "rte" and results["method"] == "fish"
    assert results["engine"] == "sparse" and (out / "sparse_delta.safetensors").is_file()  # the default engine
    plan = results["mask_phase"]["fisher_batch_plan"]  # the default: the largest batch within a training step
    assert results["fisher_batch_size"] == plan["batch_size"] and 1 <= plan["batch_size"] <= 8
    assert (plan["batch_size"] * plan["fisher_activation_bytes_per_sample"] + plan["accumulator_bytes"]
            + plan["per_layer_work_bytes"] <= 8 * plan["train_activation_bytes_per_sample"]) == plan["fits"]
    assert results["mask_phase"]["device"] == "cpu" and results["mask_phase"]["precision"] == "float32"
    logits, gold = _saved_model_outputs(out, glue, "rte", 40)
    validation = results["metrics"]["validation"]
    assert validation["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, gold.long())), rel=1e-4)
    assert validation["accuracy"] == pytest.approx(float((logits.argmax(-1) == gold).double().mean()), abs=1 / 40)
    mask = SparseMask.load(out / "sparse_mask.safetensors")
    assert results["trainable_params"] == mask.num_selected
    assert sum(v["kept"] for v in results["mask_allocation"]["per_block"].values()) == mask.num_selected
    assert results["mask_allocation"] == json.loads(json.dumps(mask.allocation()))
    assert (out / "mask_density.png").is_file()
    before = load_file(str(tiny_bert_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    moved = kept = 0
    for name, value in after.items():
        if name in mask.shapes:
            keep = mask.dense(name)
            assert torch.equal(value[~keep], before[name][~keep]), name
            moved += int((value[keep] != before[name][keep]).sum())
            kept += int(keep.sum())
    assert moved > 0.5 * kept  # AdamW with decay moves nearly every kept entry


def test_stsb_regression_reports_pearson_and_spearman(tiny_bert_dir, tmp_path):
    from scipy.stats import pearsonr, spearmanr

    glue = _write_glue_task(tmp_path / "glue", "STS-B", "index\tsentence1\tsentence2\tscore",
                            lambda i: (i, _sentence(i), _sentence(i + 2), f"{(i * 37 % 50) / 10:.1f}"), 32, 32)
    out = tmp_path / "stsb"
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "stsb", "--data-dir", str(glue),
                 "--method", "random", "--keep-ratio", "0.1", "--max-train-samples", "32",
                 "--max-eval-samples", "32", "--ignore-mismatched-sizes", "true", "--output-dir", str(out), *FAST]) == 0
    predictions, gold = _saved_model_outputs(out, glue, "stsb", 32)
    assert _results(out)["learning_rate"] == 1e-2  # random entries' own default, not the Fisher mask's 1e-3
    validation = _results(out)["metrics"]["validation"]
    assert validation["pearson"] == pytest.approx(pearsonr(predictions[:, 0], gold)[0], abs=1e-5)
    assert validation["spearmanr"] == pytest.approx(spearmanr(predictions[:, 0], gold)[0], abs=1e-5)


def test_mask_command_and_reuse_of_the_mask(tiny_bert_dir, tmp_path):
    out = tmp_path / "mask"
    assert main(["mask", "--model", str(tiny_bert_dir), "--task", "demo", "--num-samples", "24",
                 "--keep-ratio", "0.02", "--max-train-samples", "64", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "mask_summary.json").read_text())
    assert summary["num_selected"] == SparseMask.load(out / "sparse_mask.safetensors").num_selected
    assert "fisher_seconds" in summary and "per_layer" in summary
    train_out = tmp_path / "train"
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--mask-file",
                 str(out / "sparse_mask.safetensors"), "--max-train-samples", "32", "--max-eval-samples", "32",
                 "--output-dir", str(train_out), *FAST]) == 0
    assert _results(train_out)["trainable_params"] == summary["num_selected"]


def test_full_method_on_own_csv_files(tiny_bert_dir, tmp_path):
    rows = ["text,label"] + [f"the product is {'good' if i % 2 else 'bad'},{'pos' if i % 2 else 'neg'}" for i in range(20)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:9]) + "\n")
    out = tmp_path / "full"
    assert main(["train", "--model", str(tiny_bert_dir), "--train-file", str(tmp_path / "train.csv"),
                 "--validation-file", str(tmp_path / "dev.csv"), "--text-columns", "text", "--method", "full",
                 "--output-dir", str(out), *FAST]) == 0
    results = _results(out)
    assert results["trainable_params"] == results["total_params"]
    validation = results["metrics"]["validation"]
    assert 0.0 <= validation["f1"] <= 1.0 and validation["accuracy"] in {i / 8 for i in range(9)}  # 8 dev rows


def test_validation_during_training_is_logged_and_its_last_point_is_the_final_score(tiny_bert_dir, tmp_path):
    """--eval-strategy epoch, as in transformers' example scripts: Trainer evaluates the validation split during
    training and results.json keeps the curve (whether a run converged); its last point is the final model's score."""
    glue = _write_glue_task(tmp_path / "glue", "STS-B", "index\tsentence1\tsentence2\tscore",
                            lambda i: (i, _sentence(i), _sentence(i + 2), f"{(i * 37 % 50) / 10:.1f}"), 32, 32)
    out = tmp_path / "stsb"
    fast = [a for a in FAST if a not in ("--num-train-epochs", "1")]
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "stsb", "--data-dir", str(glue), "--method", "lora",
                 "--lora-r", "4", "--num-train-epochs", "3", "--eval-strategy", "epoch", "--learning-rate", "1e-2",
                 "--max-train-samples", "32", "--max-eval-samples", "32", "--ignore-mismatched-sizes", "true",
                 "--output-dir", str(out), *fast]) == 0
    results = _results(out)
    curve = results["validation_log"]
    assert [point["step"] for point in curve] == [4, 8, 12]  # 32 rows / batch 8 = 4 steps an epoch
    assert len({point["pearson"] for point in curve}) == 3  # three different models were scored
    final = results["metrics"]["validation"]
    assert curve[-1]["pearson"] == pytest.approx(final["pearson"], abs=1e-6)
    assert curve[-1]["loss"] == pytest.approx(final["loss"], rel=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["--task", "nope"], "Unknown task"),
    (["--task", "rte", "--data-dir", "/nonexistent/glue"], "does not exist"),
    (["--task", "demo", "--mask-file", "/nonexistent/mask.safetensors"], "No mask file"),
])
def test_bad_input_is_a_clear_error(tiny_bert_dir, tmp_path, capsys, argv, message):
    code = main(["train", "--model", str(tiny_bert_dir), *argv, "--output-dir", str(tmp_path / "x"), *FAST])
    assert code == 2
    assert message in capsys.readouterr().err


def test_keep_ratio_out_of_range_and_missing_output_dir(tiny_bert_dir, capsys):
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--keep-ratio", "2",
                 "--output-dir", "/tmp/x"]) == 2
    assert "--keep-ratio must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--task", "demo"])


def test_resume_from_checkpoint_reuses_the_checkpoint_mask(tiny_bert_dir, tmp_path, caplog):
    out = tmp_path / "run"
    common = ["train", "--model", str(tiny_bert_dir), "--task", "demo", "--max-train-samples", "32",
              "--max-eval-samples", "16", "--num-samples", "16", "--keep-ratio", "0.05", "--output-dir", str(out),
              *[a for a in FAST if a not in ("--save-strategy", "no")], "--save-strategy", "steps", "--save-steps", "2"]
    assert main(common) == 0
    first = SparseMask.load(out / "sparse_mask.safetensors")
    checkpoint = out / "checkpoint-2"
    assert SparseMask.load(checkpoint / "sparse_mask.safetensors").num_selected == first.num_selected
    # a different seed would draw other Fisher samples; the resumed run must keep the checkpoint's mask
    assert main([*common, "--seed", "7", "--resume-from-checkpoint", str(checkpoint)]) == 0
    resumed = SparseMask.load(out / "sparse_mask.safetensors")
    assert all(torch.equal(resumed.indices[n], first.indices[n]) for n in first.indices)
    caplog.clear()  # a new ratio does not apply to a resumed run: it is said, not silently dropped
    assert main([*common, "--keep-ratio", "0.1", "--resume-from-checkpoint", str(checkpoint)]) == 0
    assert "--keep-ratio 0.1 does not apply to a resumed run" in caplog.text
    assert SparseMask.load(out / "sparse_mask.safetensors").num_selected == first.num_selected


def test_sparse_engine_writes_a_delta_that_merges_into_the_same_model(tiny_bert_dir, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "sparse"
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--engine", "sparse", "--max-train-samples",
                 "32", "--max-eval-samples", "16", "--num-samples", "16", "--keep-ratio", "0.05",
                 "--learning-rate", "1e-2", "--weight-decay", "0.1", "--output-dir", str(out), *FAST]) == 0
    results = _results(out)
    mask = SparseMask.load(out / "sparse_mask.safetensors")
    assert results["engine"] == "sparse"
    assert results["optimizer_state_bytes"] <= 8 * mask.num_selected + 4 * len(mask.indices)
    assert results["delta_file_bytes"] < results["dense_checkpoint_bytes"]
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_bert_dir), "--delta", str(out / "sparse_delta.safetensors"),
                 "--output-dir", str(merged)]) == 0
    a = AutoModelForSequenceClassification.from_pretrained(out)
    b = AutoModelForSequenceClassification.from_pretrained(merged)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name
    assert main(["merge", "--model", str(out), "--delta", str(out / "sparse_delta.safetensors"),
                 "--output-dir", str(tmp_path / "wrong")]) == 2  # the fine-tuned model is not the base
    assert "already holds every value" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--method", "fish"], ["--method", "lora", "--lora-r", "4", "--fish",
                                                          "--budget", "50%", "--fisher-warmup-steps", "2"]])
def test_ird_selection_from_the_cli_writes_its_report_and_plot(tiny_bert_dir, tmp_path, extra):
    out = tmp_path / "ird"
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--max-train-samples", "64",
                 "--max-eval-samples", "16", "--num-samples", "32", "--selection", "ird", "--ird-rounds", "2",
                 "--ird-criterion-samples", "16", "--keep-ratio", "0.05", *extra, "--output-dir", str(out), *FAST]) == 0
    report = json.loads((out / "ird_report.json").read_text())
    assert [r["samples"] for r in report["rounds"]] == [32, 16] and (out / "ird_rounds.png").is_file()
    assert _results(out)["selection"] == "ird"
    mask = SparseMask.load(out / "sparse_mask.safetensors")
    assert mask.config["selection"] == "ird"
    # results.json names the round the criterion picked: the one with the lowest probe loss
    picked = _results(out)["ird"]
    assert picked["criterion"] == "probe" and len(picked["round_criteria"]) == 2
    assert picked["round"] == report["best_round"] == mask.config["ird_round"]
    assert picked["round_criteria"][picked["round"]] == min(picked["round_criteria"])


def test_ird_bad_shrink_is_refused_before_any_work(tiny_bert_dir, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--selection", "ird",
                 "--ird-sample-shrink", "1.5", "--output-dir", str(tmp_path), *FAST]) == 2
    assert "--ird-sample-shrink" in capsys.readouterr().err  # the flag, not the config field
    assert not any(tmp_path.iterdir())


def _no_fisher(monkeypatch):
    from sparsepeft.importance import scores
    from sparsepeft.selection import grouped

    def refuse(*args, **kwargs):
        raise AssertionError("the Fisher pass ran before the input was checked")

    for module in (scores, grouped):  # the one-pass and the grouped Fisher of a mask
        monkeypatch.setattr(module, "estimate_fisher", refuse)
    monkeypatch.setattr(scores, "mean_gradient", refuse)


def test_an_output_folder_holding_another_run_is_refused_unless_overwritten(tiny_bert_dir, tmp_path, capsys,
                                                                            monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--max-train-samples", "16",
                 "--max-eval-samples", "8", "--num-samples", "8", "--keep-ratio", "0.05", "--output-dir", str(out),
                 *FAST]) == 0
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    lora = ["train", "--model", str(tiny_bert_dir), "--task", "demo", "--method", "lora", "--max-train-samples", "16",
            "--max-eval-samples", "8", "--output-dir", str(out), *FAST]
    with monkeypatch.context() as patch:
        _no_fisher(patch)
        assert main(lora) == 2
    err = capsys.readouterr().err
    assert "holds another run's files" in err and "--overwrite-output-dir" in err and "sparse_delta" in err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched
    assert main([*lora, "--overwrite-output-dir", "true"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "adapter_model.safetensors" in names and "notes.txt" in names  # the user's own file stays
    assert not names & {"sparse_delta.safetensors", "sparse_mask.safetensors", "model.safetensors", "mask_density.png"}
    assert _results(out)["method"] == "lora"


@pytest.mark.parametrize("problem", ["parent is a file", "resume path"])
def test_output_and_resume_problems_are_found_before_the_fisher_pass(tiny_bert_dir, tmp_path, capsys, monkeypatch,
                                                                    problem):
    _no_fisher(monkeypatch)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out" if problem == "parent is a file" else tmp_path / "out"
    extra = ["--resume-from-checkpoint", str(tmp_path / "checkpoint-9")] if problem == "resume path" else []
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--output-dir", str(out), *extra,
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert ("is a file" in err) if problem == "parent is a file" else ("checkpoint-9: no such folder" in err)
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["fish", "full"])
def test_a_diverging_run_stops_at_its_first_non_finite_gradient_and_saves_no_weights(tiny_bert_dir, tmp_path, capsys,
                                                                                    method):
    out = tmp_path / "nan"
    code = main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--method", method, "--max-train-samples",
                 "32", "--max-eval-samples", "8", "--num-samples", "8", "--optim", "sgd", "--learning-rate", "1e30",
                 "--max-grad-norm", "0", "--output-dir", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert "Training stopped at step" in err and "NaN/inf" in err and "learning rate" in err and "Traceback" not in err
    written = {p.name for p in out.iterdir()} if out.exists() else set()
    assert not written & {"model.safetensors", "sparse_delta.safetensors", "results.json"}


def test_evaluate_only_writes_no_model_copy_and_reports_nothing_trained(tiny_bert_dir, tmp_path):
    out = tmp_path / "zero"
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--method", "full", "--max-steps", "0",
                 "--max-eval-samples", "8", "--output-dir", str(out), *FAST]) == 0
    results = _results(out)
    assert not (out / "model.safetensors").exists()
    assert results["trainable_params"] == 0 and results["learning_rate"] is None and results["train_steps"] == 0


def test_lora_results_record_the_resolved_config_with_peft_defaults(tiny_bert_dir, tmp_path):
    out = tmp_path / "lora"
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--method", "lora", "--max-steps", "1",
                 "--max-train-samples", "8", "--max-eval-samples", "8", "--output-dir", str(out), *FAST]) == 0
    options = _results(out)["method_options"]
    assert options["r"] == 8 and options["lora_alpha"] == 16 and sorted(options["target_modules"]) == ["query", "value"]


def test_a_selection_variant_runs_from_the_cli_and_results_say_which(tiny_bert_dir, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="sparsepeft"):
        assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--max-train-samples", "16",
                     "--max-eval-samples", "8", "--num-samples", "8", "--budget", "lora:r=2", "--candidates", "linear",
                     "--importance", "taylor", "--selection-strategy", "per_block", "--output-dir", str(out),
                     *FAST]) == 0
    results = _results(out)
    variant = results["selection_variant"]
    assert variant["importance"] == "taylor" and variant["candidates"] == "linear"
    assert variant["strategy"] == "per_block" and variant["budget_spec"] == "lora:r=2"
    assert results["trainable_params"] == variant["budget"] == results["mask_allocation"]["num_selected"]
    assert "Selection: taylor over linear candidates, per_block, at init, budget lora:r=2" in caplog.text
    header = SparseMask.load(out / "sparse_mask.safetensors").config
    assert header["importance"] == "taylor" and header["candidates"] == "linear"


@pytest.mark.parametrize("argv,flag,message", [
    (["--candidates", "poolr"], "--candidates", "matches no trainable parameter"),
    (["--budget", "lora:r=4096"], "--budget", "larger than"),
    (["--method", "random", "--fisher-at", "warmup"], "--fisher-at", "measures nothing"),
    (["--fisher-at", "warmup", "--fisher-warmup-steps", "0"], "--fisher-warmup-steps", "warms nothing up"),
    (["--method", "lora", "--importance", "gradient"], "--importance", "full-model mask"),
])
def test_a_selection_that_cannot_be_made_is_a_clear_error_and_writes_nothing(tiny_bert_dir, tmp_path, capsys,
                                                                             monkeypatch, argv, flag, message):
    _no_fisher(monkeypatch)
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--max-train-samples", "16",
                 "--num-samples", "8", "--output-dir", str(out), *argv, *FAST]) == 2
    err = capsys.readouterr().err
    assert flag in err and message in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_sparse_engine_checkpoints_hold_the_delta_only_and_resume_to_the_same_weights(tiny_bert_dir, tmp_path):
    def run(out, *extra):
        assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--max-train-samples", "32",
                     "--max-eval-samples", "8", "--num-samples", "16", "--keep-ratio", "0.05", "--output-dir", str(out),
                     "--learning-rate", "1e-2", *[a for a in FAST if a not in ("--save-strategy", "no")],
                     "--save-strategy", "steps", "--save-steps", "2", "--num-train-epochs", "2", *extra]) == 0
        return load_file(out / "model.safetensors")

    whole = run(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert "sparse_delta.safetensors" in names and "optimizer.pt" in names and "config.json" in names
    assert not {n for n in names if n.startswith(("model", "pytorch_model"))}  # no dense copy of the model
    assert (tmp_path / "whole" / "model.safetensors").is_file()  # the final output still loads in the usual tools
    # resume in another folder from step 2 of the first run: the same weights at the end, bit for bit
    resumed = run(tmp_path / "resumed", "--resume-from-checkpoint", str(checkpoint))
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    dense = tmp_path / "dense"
    run(dense, "--engine", "dense-mask")
    assert (dense / "checkpoint-2" / "model.safetensors").is_file()  # the reference engine keeps dense checkpoints


@pytest.mark.parametrize("engine", ["sparse", "dense-mask"])
def test_the_best_checkpoint_on_validation_is_the_model_that_is_saved_and_scored(tiny_bert_dir, tmp_path, engine):
    """--load-best-model-at-end, as with Trainer: the final model is the checkpoint with the best validation score
    (under the sparse engine, a delta-only checkpoint), and results.json reports that model."""
    out = tmp_path / engine
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--max-train-samples", "32",
                 "--max-eval-samples", "16", "--num-samples", "16", "--keep-ratio", "0.05", "--engine", engine,
                 "--learning-rate", "3e-2", *[a for a in FAST if a not in ("--save-strategy", "no", "--num-train-epochs",
                                                                       "1")],
                 "--num-train-epochs", "4", "--eval-strategy", "epoch", "--save-strategy", "epoch",
                 "--load-best-model-at-end", "true", "--metric-for-best-model", "loss", "--output-dir", str(out)]) == 0
    results = _results(out)
    losses = [point["loss"] for point in results["validation_log"]]
    assert len(losses) == 4 and losses.index(min(losses)) != 3  # the best model is not the last one here
    assert results["metrics"]["validation"]["loss"] == pytest.approx(min(losses), rel=1e-5)
