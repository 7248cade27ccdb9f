"""Shared helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine() -> dict:
    import os

    return {"cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "processor": platform.processor() or
            platform.machine(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def provenance(command: list[str] | None = None) -> dict:
    """What a result was measured on: commit (and whether the tree had uncommitted changes), package versions,
    machine and the exact command line. Every result file carries it."""
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "sparsepeft"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks")
    # a copy of the tree without .git (a device machine's) names its commit in SPARSEPEFT_COMMIT
    commit = git("rev-parse", "HEAD") or os.environ.get("SPARSEPEFT_COMMIT") or None
    return {"commit": commit, "dirty": bool(dirty), "versions": versions,
            "machine": machine(), "command": list(command if command is not None else sys.argv),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def mcnemar(ours: list[bool], theirs: list[bool]) -> dict:
    """Exact McNemar test of two runs on the same questions: the ones only one of them gets right, against a
    fair coin. ``diff`` is the accuracy difference in points."""
    only_ours = sum(a and not b for a, b in zip(ours, theirs))
    only_theirs = sum(b and not a for a, b in zip(ours, theirs))
    return {"diff": 100 * (only_ours - only_theirs) / len(ours), "only_arm_right": only_ours,
            "only_reference_right": only_theirs, "questions": len(ours),
            "mcnemar_p": mcnemar_p(only_ours, only_theirs)}


def mcnemar_p(only_ours: int, only_theirs: int) -> float:
    """Exact McNemar p from the two discordant counts: the split of the questions only one run gets right, against
    a fair coin (1.0 when the runs never disagree)."""
    from scipy.stats import binomtest

    discordant = only_ours + only_theirs
    return float(binomtest(only_ours, discordant, 0.5).pvalue) if discordant else 1.0


PERMUTATION_BATCH = 1000


def paired_weighted_test(ours: list[bool], theirs: list[bool], weights: list[float], resamples: int = 99_999) -> dict:
    """Two runs on the same questions, scored by ``sum(weight * hit)`` (a macro-averaged balanced accuracy):
    the paired permutation test that swaps the two runs' answers question by question (a sign flip of each
    question's weighted difference; only the questions they disagree on can move it). Exact when those are few
    enough to enumerate, otherwise ``resamples`` random flips from a fixed seed. With equal weights it is
    exactly McNemar's test. ``diff`` is the score difference in points."""
    import numpy
    from scipy.stats import permutation_test

    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    ours_w = numpy.array([weights[i] * ours[i] for i in differ], dtype=float)
    theirs_w = numpy.array([weights[i] * theirs[i] for i in differ], dtype=float)
    diff = 100 * float(ours_w.sum() - theirs_w.sum())
    if not differ:
        return {"diff": 0.0, "disagree": 0, "p": 1.0, "questions": len(ours)}
    if len(differ) == 1:  # its two sign flips give the same |difference| (scipy needs two or more)
        return {"diff": diff, "disagree": 1, "p": 1.0, "questions": len(ours)}
    # in batches of PERMUTATION_BATCH resamples: all at once held resamples x questions floats several times over
    # (4 GB for 600 disagreements; a summary pooling three seeds' runs was killed for memory). The same p.
    test = permutation_test((ours_w, theirs_w), lambda x, y, axis: numpy.sum(x - y, axis=axis),
                            permutation_type="samples", vectorized=True, n_resamples=resamples,
                            rng=numpy.random.default_rng(0), batch=PERMUTATION_BATCH)
    return {"diff": diff, "disagree": len(differ), "p": float(test.pvalue), "questions": len(ours)}


def rss_mb(field: str = "VmRSS:") -> float:
    """Current (VmRSS:) or peak (VmHWM:) resident memory of this process, from /proc (Linux)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, device: str = "cpu") -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median(values) -> float:
    return float(statistics.median(values))


def random_token_data(n: int, seq_len: int, vocab: int, num_labels: int = 2, seed: int = 0) -> list[dict]:
    """Full-length sequences of random tokens: the compute of real text of that length, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, seq_len), generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return [{"input_ids": ids[i].tolist(), "attention_mask": [1] * seq_len, "labels": int(labels[i])} for i in range(n)]


def write_json(path: str | Path, payload) -> None:
    """Written whole or not at all: a killed benchmark leaves the previous result file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


METRIC = {"rte": "accuracy", "cola": "matthews_correlation", "stsb": "pearson", "sst2": "accuracy",
          "mrpc": "f1", "qqp": "accuracy", "qnli": "accuracy", "wnli": "accuracy", "mnli": "accuracy"}


def glue_train_command(task: str, glue_dir: str, out: Path, seed: int, *, max_train: int, max_len: int, lr: float,
                       epochs: float, batch_size: int, warmup_steps: int) -> list[str]:
    """The `sparsepeft train` command line every quality sweep shares; arms append their own flags."""
    import sys

    return [sys.executable, "-m", "sparsepeft", "train", "--task", task, "--data-dir", glue_dir,
            "--max-train-samples", str(max_train), "--max-seq-length", str(max_len), "--learning-rate", str(lr),
            "--num-train-epochs", str(epochs), "--per-device-train-batch-size", str(batch_size),
            "--per-device-eval-batch-size", "64", "--warmup-steps", str(warmup_steps), "--seed", str(seed),
            "--save-strategy", "no", "--logging-strategy", "no", "--report-to", "none", "--disable-tqdm", "true",
            "--output-dir", str(out)]


def train_once(command: list[str], out: Path, label: str, summary_only: bool = False) -> dict | None:
    """Run one training process into ``out`` unless its results.json exists (sweeps resume).

    With ``summary_only`` nothing is trained: a missing run is reported as None."""
    import subprocess

    results = out / "results.json"
    if not results.is_file() and summary_only:
        return None
    if not results.is_file():
        start = time.time()
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        write_json(out / "provenance.json", provenance(command))
        print(f"  {label}: {time.time() - start:.0f}s", flush=True)
    result = json.loads(results.read_text())
    if (out / "provenance.json").is_file():
        result["provenance"] = json.loads((out / "provenance.json").read_text())
    return result


def summarise_runs(all_results: dict, tasks, arms) -> tuple[str, dict]:
    """Mean ± sample std over seeds of each task's official metric (x100), per arm, as markdown and JSON."""
    table: dict = {}
    lines = ["| arm | " + " | ".join(f"{t.upper()} ({METRIC[t]})" for t in tasks) +
             " | trainable (first task) | train s (median) | train peak RSS MB (median) |",
             "|" + " --- |" * (len(tasks) + 4)]
    for arm in arms:
        cells, trainable, seconds, peaks = [], "", [], []
        for task in tasks:
            runs = [r for r in all_results.get((task, arm), []) if r is not None]
            values = [100 * r["metrics"]["validation"][METRIC[task]] for r in runs]
            if not values:
                cells.append("—")
                continue
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            table.setdefault(arm, {})[task] = {"mean": mean, "std": std, "values": values,
                                               "trainable_params": runs[0]["trainable_params"],
                                               "train_seconds": [r["train_seconds"] for r in runs],
                                               "train_peak_rss_mb": [r.get("train_peak_rss_mb") for r in runs],
                                               "commits": sorted({r.get("provenance", {}).get("commit") or "unrecorded"
                                                                  for r in runs})}
            cells.append(f"{mean:.2f} ± {std:.2f}")
            if not trainable:  # of the first task (heads differ in size between tasks)
                share = 100 * runs[0]["trainable_params"] / runs[0]["total_params"]
                trainable = f"{runs[0]['trainable_params']:,} ({share:.3f}%)"
            seconds += [r["train_seconds"] for r in runs]
            peaks += [r["train_peak_rss_mb"] for r in runs if r.get("train_peak_rss_mb")]
        median_s = f"{statistics.median(seconds):.0f}" if seconds else ""
        median_peak = f"{statistics.median(peaks):.0f}" if peaks else ""
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {trainable} | {median_s} | {median_peak} |")
    return "\n".join(lines), table


def glue_sweep_parser(doc: str, tasks: str, arms: str, out: str):
    """The flags every GLUE quality sweep shares (the recipe of the FISH-Tuning and layer-wise tables)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", default="../shared/data/glue")
    parser.add_argument("--tasks", default=tasks)
    parser.add_argument("--arms", default=arms)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-train-samples", type=int, default=1000)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=out)
    parser.add_argument("--summary-only", action="store_true", help="tabulate the runs that exist; train nothing")
    return parser


def run_sweep(parser, args, known_arms, run_one, name: str) -> None:
    """Every task x seed x arm (resuming), then the mean ± std table as OUT/NAME.md and OUT/NAME.json."""
    tasks, arms = args.tasks.split(","), args.arms.split(",")
    unknown = [a for a in arms if a not in known_arms]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {list(known_arms)}")
    results: dict = {}
    for task in tasks:
        for seed in map(int, args.seeds.split(",")):
            for arm in arms:
                results.setdefault((task, arm), []).append(run_one(args, task, arm, seed))
        markdown, table = summarise_runs(results, tasks, arms)
        print(markdown, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown + "\n")
    (out / f"{name}.json").write_text(json.dumps({"provenance": provenance(), "args": vars(args), "table": table},
                                                 indent=2) + "\n")
