"""GLUE quality of layer-wise tuning (IST, random, LISA) against vanilla LoRA and DoRA on MiniLM.

    python benchmarks/layerwise_quality.py --glue-dir ../shared/data/glue --out runs/layerwise

Every arm is LoRA r=8 on query/value (DoRA: the same with magnitude vectors) with the task head trained,
the FISH-Tuning sweep's recipe (1000-row training subsets, 2 epochs, lr 1e-3, batch 16). The layer-wise
arms train, each step, int(0.25·6) = 1 of MiniLM's 6 blocks (IST: drawn by learned scores, probes every
10 steps on 16 samples; random: uniformly) or LISA's 2 blocks re-drawn every 20 steps. Runs that already
have a results.json are skipped, so a sweep resumes; the mean ± std table over seeds is written to
OUT/layerwise.md and OUT/layerwise.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import METRIC, glue_train_command, summarise_runs, train_once  # noqa: E402

LORA = ["--method", "lora", "--lora-r", "8", "--target-modules", "query,value"]
ARMS = {
    "lora": LORA,
    "dora": ["--method", "dora", "--lora-r", "8", "--target-modules", "query,value"],
    "ist": [*LORA, "--layers", "ist"],
    "random": [*LORA, "--layers", "random"],
    "lisa": [*LORA, "--layers", "lisa"],
    "ist-dora": ["--method", "dora", "--lora-r", "8", "--target-modules", "query,value", "--layers", "ist"],
}


def run_one(args, task: str, arm: str, seed: int) -> dict:
    out = Path(args.out) / task / arm / f"seed{seed}"
    command = glue_train_command(task, args.glue_dir, out, seed, max_train=args.max_train_samples,
                                 max_len=args.max_seq_length, lr=args.lr, epochs=args.epochs,
                                 batch_size=args.batch_size, warmup_steps=args.warmup_steps)
    command += ARMS[arm]
    if METRIC[task] == "pearson":
        command += ["--ignore-mismatched-sizes", "true"]
    return train_once(command, out, f"{task} {arm} seed {seed}", args.summary_only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", default="../shared/data/glue")
    parser.add_argument("--tasks", default="sst2,cola,stsb,rte")
    parser.add_argument("--arms", default="lora,dora,ist,random,lisa")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-train-samples", type=int, default=1000)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="runs/layerwise")
    parser.add_argument("--summary-only", action="store_true", help="tabulate the runs that exist; train nothing")
    args = parser.parse_args()
    tasks, arms = args.tasks.split(","), args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    results: dict = {}
    for task in tasks:
        for seed in map(int, args.seeds.split(",")):
            for arm in arms:
                results.setdefault((task, arm), []).append(run_one(args, task, arm, seed))
        markdown, table = summarise_runs(results, tasks, arms)
        print(markdown, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layerwise.md").write_text(markdown + "\n")
    (out / "layerwise.json").write_text(json.dumps({"args": vars(args), "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
