"""benchmarks/llm_quality.py's summary row: an arm measured on two machines shows no step time or peak."""

import argparse
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_quality.py"
CPU = {"cuda": None, "cpu_count": 2, "processor": "x86_64"}
GPU = {"cuda": "NVIDIA H200", "cpu_count": 16, "processor": "x86_64"}


def _load():
    spec = importlib.util.spec_from_file_location("llm_quality_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(machine: dict, step_seconds: float, peak: float) -> dict:
    metrics = {"acc": 0.5, "acc_norm": 0.5, "answer_nll": 1.0}
    return {"metrics": {"validation": metrics, "test": metrics}, "trainable_params": 10, "train_seconds":
            200 * step_seconds, "train_steps": 200, "train_peak_rss_mb": peak, "optimizer_state_bytes": 0,
            "provenance": {"commit": "c", "machine": machine}}


def test_step_time_and_peak_are_shown_only_for_an_arm_measured_on_one_machine(tmp_path):
    module = _load()
    files = {"lora_lr0.001_seed0.json": _run(CPU, 7.0, 12000), "lora_lr0.001_seed1.json": _run(GPU, 0.2, 3000),
             "full_lr0.0001_seed0.json": _run(CPU, 9.0, 8000), "full_lr0.0001_seed1.json": _run(CPU, 11.0, 9000),
             "zero-shot.json": _run(CPU, 0.0, 600)}
    for name, run in files.items():
        (tmp_path / name).write_text(json.dumps(run))

    markdown, table = module.summary(argparse.Namespace(out=str(tmp_path)), ["zero-shot", "lora", "full"])

    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in markdown.splitlines()[2:]}
    assert rows["lora"][7:9] == ["—", "—"]  # 7 s on the CPU and 0.2 s on a GPU have no meaningful median
    assert rows["lora"][-1] == "2-core x86_64 CPU; NVIDIA H200 |"
    assert rows["full"][7:9] == ["10.00", "8500"]
    assert table["lora"]["machines"] == ["2-core x86_64 CPU", "NVIDIA H200"]
    assert table["zero-shot"]["seeds"] == 1  # one untrained run, not one per seed


def test_answer_concentration_flags_a_run_that_gives_one_answer_to_every_question(tmp_path, monkeypatch):
    from sparsepeft.data.multiple_choice import ChoiceExample

    module = _load()
    binary = [ChoiceExample(f"p{i}", ("yes", "no"), int(i % 4 == 0), "", "binary") for i in range(8)]  # 2 of 8 'no'
    varied = [ChoiceExample(f"q{i}", (f"a{i}", f"b{i}", f"c{i}"), i % 3, "", "varied") for i in range(6)]
    monkeypatch.setattr(module, "_split_questions", lambda data_dir, seed, task: {"test": binary + varied})
    always_yes = [[0.0, -1.0]] * 8 + [[-1.0, 0.0, -2.0]] * 6  # 'yes' throughout; the middle option of each
    mixed = [[0.0, -1.0] if i % 2 else [-1.0, 0.0] for i in range(8)] + [[-1.0, 0.0, -2.0]] * 6
    for seed, scores in ((0, always_yes), (1, mixed)):
        run = {"learning_rate": 1e-3, "seed": seed, "data_split": {"seed": 0}, "option_log_likelihoods": {"test": scores},
               "metrics": {"validation": {"acc": 0.5, "acc_norm": 0.5, "answer_nll": 1.0,
                                              "macro_balanced_acc": 0.5}}}
        (tmp_path / f"lora_lr0.001_seed{seed}.json").write_text(json.dumps(run))

    markdown, table = module.answer_concentration(
        argparse.Namespace(out=str(tmp_path), data_dir="d", task="binary,varied"), ["lora"])

    assert table["always the most frequent right answer"]["binary"] == ("yes", 0.75)
    assert table["lora_lr0.001_seed0"]["binary"] == ("yes", 1.0)
    assert table["lora_lr0.001_seed1"]["binary"][1] == 0.5  # half and half
    assert table["lora_lr0.001_seed0"]["varied"][1] == 1 / 6  # a different text for every question
    assert "| lora_lr0.001_seed0 | 1.00 ('yes') | 0.17 ('b0') |" in markdown
