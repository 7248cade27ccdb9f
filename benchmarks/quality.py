"""GLUE quality of FISH Mask against full fine-tuning and a random mask of the same budget.

    python benchmarks/quality.py --glue-dir ../shared/data/glue --out runs/quality

Every (task, method, seed) is one `sparsepeft train` process writing its own results.json; runs that
already have one are skipped, so an interrupted sweep resumes. The table (mean ± sample std over seeds
of each task's official metric) is printed and written to OUT/quality.md and OUT/quality.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import glue_train_command, provenance, summarise_runs, train_once  # noqa: E402

# extra arms beside --method full/fish/random: IRD and the plain FISH mask from the same initial samples
# (768 of the 1000 rows, so that IRD's criterion has 232 held-out training rows)
ARMS = {
    "fish-768": ["--method", "fish", "--num-samples", "768"],
    "ird-768": ["--method", "fish", "--selection", "ird", "--num-samples", "768"],
}


def run_one(args, task: str, method: str, seed: int) -> dict:
    out = Path(args.out) / task / method / f"seed{seed}"
    command = glue_train_command(task, args.glue_dir, out, seed, max_train=args.max_train_samples,
                                 max_len=args.max_seq_length, lr=args.full_lr if method == "full" else args.sparse_lr,
                                 epochs=args.epochs, batch_size=args.batch_size, warmup_steps=args.warmup_steps)
    command += ["--keep-ratio", str(args.keep_ratio), "--num-samples", str(args.num_samples),
                *ARMS.get(method, ["--method", method])]
    return train_once(command, out, f"{task} {method} seed {seed}", args.summary_only)


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
    parser.add_argument("--summary-only", action="store_true", help="tabulate the runs that exist; train nothing")
    args = parser.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    results: dict = {}
    for seed in map(int, args.seeds.split(",")):
        for task in tasks:
            for method in methods:
                results.setdefault((task, method), []).append(run_one(args, task, method, seed))
    markdown, table = summarise_runs(results, tasks, methods)
    print(markdown)
    out = Path(args.out)
    (out / "quality.md").write_text(markdown + "\n")
    (out / "quality.json").write_text(json.dumps({"provenance": provenance(), "args": vars(args), "table": table},
                                                 indent=2) + "\n")


if __name__ == "__main__":
    main()
