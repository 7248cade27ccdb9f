"""benchmarks/llm_quality.py's question-by-question comparison: McNemar counts from kept option scores."""

import argparse
import importlib.util
import json
import random
from pathlib import Path

import pytest
from scipy.stats import binomtest

from conftest import WORDS
from sparsepeft.data.multiple_choice import choice_metrics, load_multiple_choice

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_quality.py"


@pytest.fixture(scope="module")
def llm_quality():
    spec = importlib.util.spec_from_file_location("llm_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _task(folder: Path, n: int = 60) -> Path:
    examples = [{"input": f"q{i} {WORDS[i % len(WORDS)]}",
                 "target_scores": {f"{WORDS[(i + k) % len(WORDS)]} {k}": int(k == i % 3) for k in range(3)}}
                for i in range(n)]
    path = folder / "social_iqa" / "task.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"canary": "test data written by the test", "examples": examples}))
    return path


def _run(method: str, questions: dict, right: dict, lr: float) -> dict:
    """A run file whose option scores put the top score on the answer exactly for the questions in ``right``."""
    scores, metrics = {}, {}
    for split, items in questions.items():
        scores[split] = [[0.0 if (k == q.answer) == (i in right[split]) else -1.0 - k for k in range(3)]
                         for i, q in enumerate(items)]
        metrics[split] = choice_metrics(items, scores[split])
    return {"method": method, "seed": 0, "learning_rate": lr, "data_split": {"seed": 0}, "metrics": metrics,
            "option_log_likelihoods": scores}


def _lora_and_full(tmp_path: Path, questions: dict, seed: int) -> tuple[Path, dict]:
    """Run files of a LoRA run right on ~40% of the questions and a full-FT run right on ~70%: (folder, which)."""
    rng = random.Random(seed)
    right = {name: {split: {i for i in range(len(items)) if rng.random() < share} for split, items in questions.items()}
             for name, share in (("lora", 0.4), ("full", 0.7))}
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora_lr0.003_seed0.json").write_text(json.dumps(_run("lora", questions, right["lora"], 3e-3)))
    (out / "full_lr0.0003_seed0.json").write_text(json.dumps(_run("full", questions, right["full"], 3e-4)))
    return out, right


def _one_task_runs(tmp_path: Path) -> tuple[argparse.Namespace, dict, dict]:
    """One task's questions, a LoRA and a full-FT run file on them, and the arguments the summary reads."""
    task = _task(tmp_path / "data")
    questions = load_multiple_choice(task, split_seed=0).evaluation
    out, right = _lora_and_full(tmp_path, questions, seed=0)
    return argparse.Namespace(out=str(out), data_dir=str(tmp_path / "data")), questions, right


def test_paired_comparison_counts_the_questions_only_one_run_gets_right(tmp_path, llm_quality):
    args, questions, right = _one_task_runs(tmp_path)
    markdown, table = llm_quality.paired_comparisons(args, ["full", "lora"])
    for split, items in questions.items():
        only_full = len(right["full"][split] - right["lora"][split])
        only_lora = len(right["lora"][split] - right["full"][split])
        entry = table[f"full_vs_lora_seed0_{split}"]
        assert (entry["only_arm_right"], entry["only_reference_right"]) == (only_full, only_lora)
        assert entry["diff"] == pytest.approx(100 * (only_full - only_lora) / len(items))
        assert entry["mcnemar_p"] == pytest.approx(binomtest(only_full, only_full + only_lora, 0.5).pvalue)
    assert "| full | lora | 0 | test |" in markdown


def test_paired_comparison_refuses_scores_from_another_split(tmp_path, llm_quality):
    task = _task(tmp_path / "data")
    questions = load_multiple_choice(task, split_seed=0).evaluation
    run = _run("lora", questions, {split: {0, 1, 2} for split in questions}, 3e-3)
    run["metrics"]["test"]["acc"] += 0.5  # the kept scores no longer give back the run's own accuracy
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora_lr0.003_seed0.json").write_text(json.dumps(run))
    (out / "full_lr0.0003_seed0.json").write_text(json.dumps(run | {"method": "full"}))
    args = argparse.Namespace(out=str(out), data_dir=str(tmp_path / "data"))
    with pytest.raises(SystemExit, match="do not match"):
        llm_quality.paired_comparisons(args, ["full", "lora"])


def test_a_suite_gets_a_paired_test_per_task_beside_the_pooled_one(tmp_path, llm_quality):
    data = tmp_path / "data"
    for name in ("social_iqa", "winowhy"):
        path = _task(tmp_path / name)
        (data / name).mkdir(parents=True)
        path.replace(data / name / "task.json")
    suite = "social_iqa,winowhy"
    from sparsepeft.experiments.pipeline import load_task_data

    questions = load_task_data(suite, str(data), split_seed=0).evaluation
    out, right = _lora_and_full(tmp_path, questions, seed=1)
    args = argparse.Namespace(out=str(out), data_dir=str(data), task=suite)
    markdown, table = llm_quality.paired_comparisons(args, ["full", "lora"])
    for split, items in questions.items():
        pooled = table[f"full_vs_lora_seed0_{split}"]
        per_task = [table[f"full_vs_lora_seed0_{split}_{task}"] for task in ("social_iqa", "winowhy")]
        for task, entry in zip(("social_iqa", "winowhy"), per_task):
            chosen = {i for i, q in enumerate(items) if q.task == task}
            only_full = len((right["full"][split] - right["lora"][split]) & chosen)
            only_lora = len((right["lora"][split] - right["full"][split]) & chosen)
            assert (entry["only_arm_right"], entry["only_reference_right"], entry["questions"]) == \
                (only_full, only_lora, len(chosen))
        assert sum(e["only_arm_right"] for e in per_task) == pooled["only_arm_right"]
        assert sum(e["questions"] for e in per_task) == pooled["questions"] == len(items)
    assert "| full | lora | 0 | test (winowhy) |" in markdown


def test_every_seed_of_a_trained_arm_is_paired_with_the_zero_shot_floor(tmp_path, llm_quality):
    task = _task(tmp_path / "data")
    questions = load_multiple_choice(task, split_seed=0).evaluation
    rng = random.Random(2)
    out = tmp_path / "out"
    out.mkdir()
    right = {}
    for name, seed in (("zero-shot", 0), ("lora", 0), ("lora", 1)):
        right[name, seed] = {split: {i for i in range(len(items)) if rng.random() < 0.5}
                             for split, items in questions.items()}
        run = _run("full" if name == "zero-shot" else "lora", questions, right[name, seed], 3e-3) | {"seed": seed}
        (out / (f"{name}.json" if name == "zero-shot" else f"lora_lr0.003_seed{seed}.json")).write_text(json.dumps(run))
    args = argparse.Namespace(out=str(out), data_dir=str(tmp_path / "data"))
    _, table = llm_quality.paired_comparisons(args, ["zero-shot", "lora"])
    for seed in (0, 1):
        entry = table[f"lora_vs_zero-shot_seed{seed}_test"]
        ours, floor = right["lora", seed]["test"], right["zero-shot", 0]["test"]
        assert (entry["only_arm_right"], entry["only_reference_right"]) == (len(ours - floor), len(floor - ours))
    assert not any(key.startswith("zero-shot_vs") for key in table)


def test_the_selection_variants_are_paired_with_fish_as_shipped(llm_quality):
    """The default of --method fish changes only if a variant beats FISH as shipped on the suite, so the summary
    must pair them question by question, not only each with LoRA."""
    pairs = llm_quality._pairs(["lora", "fish-lora8", "random-linear-lora8", "taylor-linear-lora8"])
    assert ("random-linear-lora8", "fish-lora8") in pairs and ("taylor-linear-lora8", "fish-lora8") in pairs
    assert ("fish-lora8", "lora") in pairs and len(pairs) == len(set(pairs))
    assert not [pair for pair in llm_quality._pairs(["lora", "random-linear-lora8"]) if "fish-lora8" in pair]


def test_each_pair_is_reported_once_when_an_extra_pair_repeats_a_reference_pair(llm_quality):
    """A shuffled arm against its Trainer-order twin is also an arm against a reference (LoRA, full FT): the
    summary printed that row twice."""
    arms = ["lora", "full", "fish-lora8", "lora-shuffled", "full-shuffled", "fish-lora8-shuffled",
            "random-linear-lora8-shuffled", "lora-nodropout-shuffled"]
    pairs = llm_quality._pairs(arms)
    assert len(pairs) == len(set(pairs))
    assert {("lora-shuffled", "lora"), ("full-shuffled", "full"), ("fish-lora8-shuffled", "lora-shuffled"),
            ("random-linear-lora8-shuffled", "fish-lora8-shuffled"), ("lora-shuffled", "full-shuffled"),
            ("lora-nodropout-shuffled", "lora-shuffled"), ("fish-lora8-shuffled", "lora-nodropout-shuffled")} <= set(pairs)


def test_the_grid_table_names_no_chosen_rate_for_an_arm_with_no_run(tmp_path, llm_quality):
    args, _, _ = _one_task_runs(tmp_path)
    markdown, _ = llm_quality.grid_table(args, ["lora", "fish-lora8"])
    assert "| fish-lora8 | not run | not run | not run | — | not run |" in markdown
    assert "| lora | not run |" in markdown and "| 0.003 |" in markdown
