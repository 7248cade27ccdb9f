"""GLUE quality of layer-wise tuning (IST, random, LISA) against vanilla LoRA and DoRA on MiniLM.

    python benchmarks/layerwise_quality.py --glue-dir ../shared/data/glue --out runs/layerwise

Every arm is LoRA r=8 on query/value (DoRA: the same with magnitude vectors) with the task head trained,
the FISH-Tuning sweep's recipe (1000-row training subsets, 2 epochs, lr 1e-3, batch 16). The layer-wise
arms train, each step, int(0.25·6) = 1 of MiniLM's 6 blocks (IST: drawn by learned scores, probes every
10 steps on 16 samples; random: uniformly) or LISA's 2 blocks re-drawn every 20 steps; the ``-half``
arms train int(0.5·6) = 3 blocks per step. Runs that already
have a results.json are skipped, so a sweep resumes; the mean ± std table over seeds is written to
OUT/layerwise.md and OUT/layerwise.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import METRIC, glue_sweep_parser, glue_train_command, run_sweep, train_once  # noqa: E402

LORA = ["--method", "lora", "--lora-r", "8", "--target-modules", "query,value"]
ARMS = {
    "lora": LORA,
    "dora": ["--method", "dora", "--lora-r", "8", "--target-modules", "query,value"],
    "ist": [*LORA, "--layers", "ist"],
    "random": [*LORA, "--layers", "random"],
    "lisa": [*LORA, "--layers", "lisa"],
    "ist-half": [*LORA, "--layers", "ist", "--layers-fraction", "0.5"],
    "random-half": [*LORA, "--layers", "random", "--layers-fraction", "0.5"],
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
    parser = glue_sweep_parser(__doc__, "sst2,cola,stsb,rte", "lora,dora,ist,random,lisa", "runs/layerwise")
    args = parser.parse_args()
    run_sweep(parser, args, ARMS, run_one, "layerwise")


if __name__ == "__main__":
    main()
