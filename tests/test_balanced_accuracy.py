"""The suite's headline: the mean over tasks of each task's balanced accuracy, which a constant answer cannot
move; its paired permutation test; and the LLM benchmark's rate rule, which now chooses on it."""

import argparse
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
from scipy.stats import binomtest
from sklearn.metrics import balanced_accuracy_score

from sparsepeft.data.multiple_choice import (ChoiceExample, answer_hits, balanced_weights, choice_metrics_by_task,
                                             chosen_options)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def llm_quality():
    spec = importlib.util.spec_from_file_location("llm_quality", BENCHMARKS / "llm_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _binary(n: int, yes_share: float, rng: random.Random, task: str = "binary") -> list[ChoiceExample]:
    """Questions that all offer the same two answers, 'yes' right on about ``yes_share`` of them."""
    return [ChoiceExample(f"b{i}", ("yes", "no"), 0 if rng.random() < yes_share else 1, task=task) for i in range(n)]


def _free(n: int, rng: random.Random, task: str = "free") -> list[ChoiceExample]:
    """Questions with their own three options each (social_iqa's kind)."""
    return [ChoiceExample(f"f{i}", tuple(f"option {i}-{k}" for k in range(3)), rng.randrange(3), task=task)
            for i in range(n)]


def _scores_answering(examples, answers: list[int]) -> list[list[float]]:
    return [[0.0 if k == a else -1.0 - k for k in range(len(e.options))] for e, a in zip(examples, answers)]


def test_one_answer_to_every_question_scores_exactly_chance_whichever_it_is():
    rng = random.Random(0)
    examples = _binary(40, 0.8, rng) + _free(30, rng)
    for constant in (0, 1):  # 'yes' is right on ~80%: plain accuracy would be ~0.8 or ~0.2
        answers = [constant] * 40 + [e.answer for e in examples[40:]]  # and every free question right
        metrics = choice_metrics_by_task(examples, _scores_answering(examples, answers))
        assert metrics["per_task"]["binary"]["balanced_acc"] == pytest.approx(0.5)
        assert metrics["per_task"]["free"]["balanced_acc"] == pytest.approx(1.0)
        assert metrics["macro_balanced_acc"] == pytest.approx(0.75)
    assert metrics["per_task"]["binary"]["acc"] != pytest.approx(0.5)


def test_balanced_accuracy_agrees_with_scikit_learn_and_is_accuracy_where_options_differ():
    rng = random.Random(1)
    examples = _binary(50, 0.7, rng, "a") + _free(45, rng, "b") + _binary(35, 0.3, rng, "c")
    answers = [rng.randrange(len(e.options)) for e in examples]
    scores = _scores_answering(examples, answers)
    metrics = choice_metrics_by_task(examples, scores)
    chosen = chosen_options(scores)
    for task in ("a", "b", "c"):
        members = [i for i, e in enumerate(examples) if e.task == task]
        hits = [answer_hits([examples[i]], [scores[i]])[0] for i in members]
        right = [examples[i].options[examples[i].answer] for i in members]
        picked = [examples[i].options[chosen[i]] for i in members]
        expected = balanced_accuracy_score(right, picked) if task != "b" else sum(hits) / len(hits)
        assert metrics["per_task"][task]["balanced_acc"] == pytest.approx(expected)
    mean = sum(metrics["per_task"][t]["balanced_acc"] for t in ("a", "b", "c")) / 3
    assert metrics["macro_balanced_acc"] == pytest.approx(mean)
    assert sum(balanced_weights(examples)) == pytest.approx(1.0)


def test_on_one_task_with_its_own_options_per_question_the_headline_is_acc():
    rng = random.Random(2)
    examples = _free(60, rng, "")
    scores = _scores_answering(examples, [rng.randrange(3) for _ in examples])
    metrics = choice_metrics_by_task(examples, scores)
    assert metrics["macro_balanced_acc"] == pytest.approx(metrics["acc"])
    assert "per_task" not in metrics


def test_paired_weighted_test_is_mcnemar_with_equal_weights_and_antisymmetric():
    sys.path.insert(0, str(BENCHMARKS))
    from common import paired_weighted_test

    rng = random.Random(3)
    ours = [rng.random() < 0.6 for _ in range(40)]
    theirs = [rng.random() < 0.45 for _ in range(40)]
    only_ours = sum(a and not b for a, b in zip(ours, theirs))
    only_theirs = sum(b and not a for a, b in zip(ours, theirs))
    entry = paired_weighted_test(ours, theirs, [1 / 40] * 40)
    assert entry["p"] == pytest.approx(binomtest(only_ours, only_ours + only_theirs, 0.5).pvalue)
    assert entry["diff"] == pytest.approx(100 * (only_ours - only_theirs) / 40)
    weights = [rng.random() for _ in range(40)]
    forward, backward = paired_weighted_test(ours, theirs, weights), paired_weighted_test(theirs, ours, weights)
    assert backward["diff"] == pytest.approx(-forward["diff"]) and backward["p"] == pytest.approx(forward["p"])
    assert paired_weighted_test(ours, ours, weights) == {"diff": 0.0, "disagree": 0, "p": 1.0, "questions": 40}
    one_apart = [not ours[0]] + ours[1:]  # one question differs: both of its flips are as extreme, p = 1
    assert paired_weighted_test(one_apart, ours, weights) == pytest.approx(
        {"diff": 100 * weights[0] * (1 if one_apart[0] else -1), "disagree": 1, "p": 1.0, "questions": 40})


def _suite_files(data: Path, rng: random.Random) -> None:
    """A two-task suite on disk: one task whose questions offer the same two answers, 'no' right on ~85% of
    them, and one whose questions have their own options."""
    tasks = {"fixed": [{"input": f"fixed {i}", "target_scores": {"yes": int(yes), "no": int(not yes)}}
                       for i, yes in enumerate(rng.random() < 0.15 for _ in range(200))],
             "free": [{"input": f"free {i}", "target_scores": {f"option {i}-{k}": int(k == i % 3) for k in range(3)}}
                      for i in range(150)]}
    for name, examples in tasks.items():
        (data / name).mkdir(parents=True)
        (data / name / "task.json").write_text(json.dumps({"canary": "written by the test", "examples": examples}))


def test_the_suites_rate_rule_prefers_learning_over_the_majority_answer(tmp_path, llm_quality):
    """At 1e-3 the run answers 'no' (right on ~85%) to every fixed question: high accuracy, chance balanced. At
    3e-3 it gets every 'yes' right and 3 of 5 'no': lower accuracy, balanced ~0.8. Both get the same half of
    the free task right. Pooled accuracy (the old rule) chose 1e-3; the headline chooses 3e-3."""
    from sparsepeft.data.multiple_choice import choice_metrics
    from sparsepeft.experiments.pipeline import load_task_data

    rng = random.Random(4)
    data = tmp_path / "data"
    _suite_files(data, rng)
    suite = "fixed,free"
    questions = load_task_data(suite, str(data), split_seed=0).evaluation
    out = tmp_path / "out"
    out.mkdir()

    def answer(q, i, lr):
        if q.task == "fixed":
            no = q.options.index("no")
            return no if lr == 1e-3 or (q.answer == no and i % 5 < 3) else 1 - no
        return q.answer if i % 2 == 0 else (q.answer + 1) % 3

    for lr in (1e-3, 3e-3):
        scores = {split: _scores_answering(items, [answer(q, i, lr) for i, q in enumerate(items)])
                  for split, items in questions.items()}
        metrics = {split: choice_metrics(items, scores[split]) for split, items in questions.items()}  # older runs:
        run = {"method": "lora", "seed": 0, "learning_rate": lr, "data_split": {"seed": 0},  # no headline kept
               "metrics": metrics, "option_log_likelihoods": scores}
        (out / f"lora_lr{lr:g}_seed0.json").write_text(json.dumps(run))
    args = argparse.Namespace(out=str(out), data_dir=str(data), task=suite)
    runs = {lr: json.loads((out / f"lora_lr{lr:g}_seed0.json").read_text()) for lr in (1e-3, 3e-3)}
    assert runs[1e-3]["metrics"]["validation"]["acc"] > runs[3e-3]["metrics"]["validation"]["acc"]
    assert llm_quality._score(args, runs[1e-3], "validation") < llm_quality._score(args, runs[3e-3], "validation")
    assert llm_quality.chosen_lr(args, "lora") == 3e-3
    markdown, table = llm_quality.per_task_table(args, ["lora"])
    assert table["balanced_acc"]["lora"]["all"][0] == pytest.approx(100 * llm_quality._score(args, runs[3e-3], "test"))
    assert "mean over tasks (headline)" in markdown


def _two_arm_suite(tmp_path, data_seed: int, arms, seed_rng) -> argparse.Namespace:
    """Run files of two arms at seeds 0 and 1 on a two-task suite: each arm right on about its share of the
    questions (``arms``: (arm, lr, share)), drawn from ``seed_rng(arm, seed)``. Returns the summary's args."""
    from sparsepeft.experiments.pipeline import load_task_data

    data = tmp_path / "data"
    _suite_files(data, random.Random(data_seed))
    suite = "fixed,free"
    questions = load_task_data(suite, str(data), split_seed=0).evaluation
    out = tmp_path / "out"
    out.mkdir()
    for arm, lr, right_share in arms:
        for seed in (0, 1):
            rng = seed_rng(arm, seed)
            scores = {split: _scores_answering(items, [q.answer if rng.random() < right_share else
                                                       (q.answer + 1) % len(q.options) for q in items])
                      for split, items in questions.items()}
            metrics = {split: choice_metrics_by_task(items, scores[split]) for split, items in questions.items()}
            run = {"method": arm, "seed": seed, "learning_rate": lr, "data_split": {"seed": 0}, "metrics": metrics,
                   "option_log_likelihoods": scores}
            (out / f"{arm}_lr{lr:g}_seed{seed}.json").write_text(json.dumps(run))
    return argparse.Namespace(out=str(out), data_dir=str(data), task=suite)


def test_a_suites_seed_comparison_is_on_the_headline(tmp_path, llm_quality):
    """Welch's t over seeds compares the suite's headline (and accuracy beside it), not pooled accuracy alone."""
    args = _two_arm_suite(tmp_path, 5, (("lora", 3e-3, 0.5), ("full", 3e-4, 0.8)), lambda arm, seed: random.Random(seed))
    out = Path(args.out)
    markdown, table = llm_quality.comparisons(args, ["full", "lora"])
    entry = table["full_vs_lora"]
    assert set(entry) == {"validation_macro_balanced_acc", "test_macro_balanced_acc", "test_acc"}
    headline = {arm: [100 * json.loads((out / f"{arm}_lr{lr:g}_seed{s}.json").read_text())["metrics"]["test"]
                      ["macro_balanced_acc"] for s in (0, 1)] for arm, lr in (("full", 3e-4), ("lora", 3e-3))}
    assert entry["test_macro_balanced_acc"]["diff"] == pytest.approx(sum(headline["full"]) / 2 - sum(headline["lora"]) / 2)
    assert "test macro-bal: diff (t, p)" in markdown


def test_the_seeds_phase_runs_every_arms_seed_1_before_any_seed_2(tmp_path, llm_quality):
    """A sweep on a CPU is cut short by the session: seed by seed, each arm keeps as many seeds as time allowed,
    at the rate its grid chose (no grid file yet: the grid's first point)."""
    args = argparse.Namespace(out=str(tmp_path), phase="seeds", seeds="1,2")
    plan = llm_quality.seeds_plan(args, ["zero-shot", "lora", "fish-lora8"])
    assert [(arm, seed) for arm, _, seed in plan] == [("lora", 1), ("fish-lora8", 1), ("lora", 2), ("fish-lora8", 2)]
    assert {arm: lr for arm, lr, _ in plan} == {"lora": llm_quality.grid_of("lora")[0],
                                                "fish-lora8": llm_quality.grid_of("fish-lora8")[0]}
    args.seeds = "2"
    assert [seed for _, _, seed in llm_quality.seeds_plan(args, ["lora"])] == [2]


def test_paired_tests_pool_the_seeds_after_taking_them_one_by_one(tmp_path, llm_quality):
    """Two seeds of two arms on a suite: a pooled row whose headline difference is the mean of the seeds' and
    whose disagreements are the seeds' added up; its p is no larger than the seeds' when both point one way."""
    args = _two_arm_suite(tmp_path, 6, (("lora", 3e-3, 0.45), ("full", 3e-4, 0.6)),
                          lambda arm, seed: random.Random(10 * seed + len(arm)))
    markdown, table = llm_quality.paired_comparisons(args, ["full", "lora"])
    seeds = [table[f"full_vs_lora_seed{s}_test_macro"] for s in (0, 1)]
    pooled = table["full_vs_lora_seed0+1_test_macro"]
    assert pooled["diff"] == pytest.approx((seeds[0]["diff"] + seeds[1]["diff"]) / 2)
    assert pooled["disagree"] == seeds[0]["disagree"] + seeds[1]["disagree"]
    assert pooled["questions"] == 2 * seeds[0]["questions"]
    assert all(entry["diff"] > 0 for entry in seeds) and pooled["p"] <= max(entry["p"] for entry in seeds)
    accuracy = [table[f"full_vs_lora_seed{s}_test"] for s in (0, 1)]
    assert table["full_vs_lora_seed0+1_test"]["only_arm_right"] == sum(e["only_arm_right"] for e in accuracy)
    assert table["full_vs_lora_seed0+1_test_fixed"]["questions"] == 2 * accuracy[0]["questions"] - \
        2 * table["full_vs_lora_seed0_test_free"]["questions"]
    assert "| full | lora | 0+1 | test |" in markdown


def test_the_paired_test_on_many_disagreements_holds_little_memory():
    """Three seeds pooled put ~900 disagreements into one test; scipy's permutation test drew all 99,999
    resamples at once (4 GB at 600), and a suite's summary was killed for memory beside two training runs."""
    import tracemalloc

    sys.path.insert(0, str(BENCHMARKS))
    from common import paired_weighted_test

    rng = random.Random(7)
    ours = [i % 2 == 0 for i in range(900)]
    theirs = [not hit for hit in ours]
    weights = [rng.random() / 900 for _ in ours]
    tracemalloc.start()
    entry = paired_weighted_test(ours, theirs, weights)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert entry["disagree"] == 900 and 0 <= entry["p"] <= 1
    assert peak < 300e6, f"{peak / 1e6:.0f} MB"
