"""GLUE quality of FISH Mask against full fine-tuning and a random mask of the same budget.

    python benchmarks/quality.py --glue-dir ../shared/data/glue --out runs/quality

Every (task, method, seed) is one `sparsepeft train` process writing its own results.json; runs that
already have one are skipped, so an interrupted sweep resumes. The table (mean ± sample std over seeds
of each task's official metric) is printed and written to OUT/quality.md and OUT/quality.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# extra arms beside --method full/fish/random: IRD and the plain FISH mask from the same initial samples
# (768 of the 1000 rows, so that IRD's criterion has 232 held-out training rows)
ARMS = {
    "fish-768": ["--method", "fish", "--num-samples", "768"],
    "ird-768": ["--method", "fish", "--selection", "ird", "--num-samples", "768"],
}

METRIC = {"rte": "accuracy", "cola": "matthews_correlation", "stsb": "pearson", "sst2": "accuracy",
          "mrpc": "f1", "qqp": "accuracy", "qnli": "accuracy", "wnli": "accuracy", "mnli": "accuracy"}


def run_one(args, task: str, method: str, seed: int) -> dict:
    out = Path(args.out) / task / method / f"seed{seed}"
    results = out / "results.json"
    if not results.is_file():
        lr = args.full_lr if method == "full" else args.sparse_lr
        command = [sys.executable, "-m", "sparsepeft", "train", "--task", task, "--data-dir", args.glue_dir,
                   "--keep-ratio", str(args.keep_ratio), "--num-samples", str(args.num_samples),
                   "--max-train-samples", str(args.max_train_samples), "--max-seq-length", str(args.max_seq_length),
                   "--learning-rate", str(lr), "--num-train-epochs", str(args.epochs),
                   "--per-device-train-batch-size", str(args.batch_size), "--per-device-eval-batch-size", "64",
                   "--warmup-steps", str(args.warmup_steps), "--seed", str(seed), "--save-strategy", "no",
                   "--logging-strategy", "no", "--report-to", "none", "--disable-tqdm", "true",
                   "--output-dir", str(out), *ARMS.get(method, ["--method", method])]
        start = time.time()
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.log", "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"  {task} {method} seed {seed}: {time.time() - start:.0f}s", flush=True)
    return json.loads(results.read_text())


def summarise(all_results: dict, tasks, methods) -> tuple[str, dict]:
    table = {}
    header = "| method | " + " | ".join(f"{t.upper()} ({METRIC[t]})" for t in tasks) + " | trainable |"
    lines = [header, "|" + " --- |" * (len(tasks) + 2)]
    for method in methods:
        cells, trainable = [], ""
        for task in tasks:
            runs = all_results.get((task, method), [])
            values = [100 * r["metrics"]["validation"][METRIC[task]] for r in runs]
            if not values:
                cells.append("—")
                continue
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            table.setdefault(method, {})[task] = {"mean": mean, "std": std, "values": values}
            cells.append(f"{mean:.2f} ± {std:.2f}")
            trainable = f"{100 * runs[0]['trainable_params'] / runs[0]['total_params']:.2f}%"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {trainable} |")
    return "\n".join(lines), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", default="../shared/data/glue")
    parser.add_argument("--tasks", default="rte,cola,stsb,sst2")
    parser.add_argument("--methods", default="full,fish,random")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-train-samples", type=int, default=1000)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--keep-ratio", type=float, default=0.005)
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--sparse-lr", type=float, default=2e-3)
    parser.add_argument("--out", default="runs/quality")
    args = parser.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    results: dict = {}
    for seed in map(int, args.seeds.split(",")):
        for task in tasks:
            for method in methods:
                results.setdefault((task, method), []).append(run_one(args, task, method, seed))
    markdown, table = summarise(results, tasks, methods)
    print(markdown)
    out = Path(args.out)
    (out / "quality.md").write_text(markdown + "\n")
    (out / "quality.json").write_text(json.dumps({"args": vars(args), "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
