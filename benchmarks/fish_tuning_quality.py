"""GLUE quality of FISH-Tuning against the vanilla PEFT method at the same trainable budget.

    python benchmarks/fish_tuning_quality.py --glue-dir ../shared/data/glue --out runs/fish_tuning

Each arm is one `sparsepeft train` command line (below). For every method the vanilla baseline is the
smaller config (LoRA/DoRA r=8, adapter bottleneck 32); the other arms build the larger config (r=16,
bottleneck 64) and mask it down to exactly the baseline's trainable count with Fisher, random or
lowest-Fisher selection. Runs that already have a results.json are skipped, so a sweep resumes; the
mean ± std table over seeds is written to OUT/fish_tuning.md and OUT/fish_tuning.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import METRIC, glue_sweep_parser, glue_train_command, run_sweep, train_once  # noqa: E402

LORA = ["--target-modules", "query,value"]
BASELINES = {  # vanilla config at the budget, and the larger config that is masked down to it
    "lora": (["--method", "lora", "--lora-r", "8", *LORA], ["--method", "lora", "--lora-r", "16", *LORA], "lora:r=8"),
    "dora": (["--method", "dora", "--lora-r", "8", *LORA], ["--method", "dora", "--lora-r", "16", *LORA], "dora:r=8"),
    "adapter": (["--method", "houlsby", "--bottleneck-size", "32"], ["--method", "houlsby", "--bottleneck-size", "64"],
                "houlsby:bottleneck_size=32"),
}
NAMES = {"lora": ("lora-r8", "lora-r16>r8"), "dora": ("dora-r8", "dora-r16>r8"), "adapter": ("adapter-32", "adapter-64>32")}
# variants of LoRA's Fisher (B = 0 at init) the default is chosen from, and a structured non-Fisher arm
LORA_VARIANTS = {
    "fisher-at-init": ["--fisher-at", "init"],
    "fisher-per-matrix": ["--selection-strategy", "per_tensor"],
    "fisher-expected": ["--fisher-mode", "expected"],
    "fisher-warmup100": ["--fisher-warmup-steps", "100"],
    "B-only": ["--always-train", "classifier,re:lora_B"],  # the whole budget to B, A frozen at init (LoRA-FA)
}


def _arms() -> dict[str, list[str]]:
    arms: dict[str, list[str]] = {}
    for method, (vanilla, larger, budget) in BASELINES.items():
        small, masked = NAMES[method]
        arms[small] = vanilla
        for selection in ("fisher", "random", "lowest"):
            arms[f"{masked}-{selection}"] = [*larger, "--fish", "--budget", budget, "--selection", selection]
        if method == "lora":
            for variant, flags in LORA_VARIANTS.items():
                arms[f"{masked}-{variant}"] = [*larger, "--fish", "--budget", budget, *flags]
    return arms


ARMS = _arms()
# PEFT's own sparse adapter at LoRA r=8's count (r(m+n) entries per query/value weight + the head): its random
# entries against each layer's top entries by the base model's Fisher (sparsepeft.shira_mask_fn)
ARMS["shira-r8-random"] = ["--method", "shira", "--shira-r", "8", *LORA, "--selection", "random"]
ARMS["shira-r8-fisher"] = ["--method", "shira", "--shira-r", "8", *LORA, "--selection", "fisher"]


def run_one(args, task: str, arm: str, seed: int) -> dict:
    out = Path(args.out) / task / arm.replace(">", "_to_") / f"seed{seed}"
    command = glue_train_command(task, args.glue_dir, out, seed, max_train=args.max_train_samples,
                                 max_len=args.max_seq_length, lr=args.lr, epochs=args.epochs,
                                 batch_size=args.batch_size, warmup_steps=args.warmup_steps)
    command += ["--num-samples", str(args.num_samples), "--fisher-warmup-steps", str(args.fisher_warmup), *ARMS[arm]]
    if METRIC[task] == "pearson":
        command += ["--ignore-mismatched-sizes", "true"]
    return train_once(command, out, f"{task} {arm} seed {seed}", args.summary_only)


def main() -> None:
    parser = glue_sweep_parser(__doc__, "sst2,rte,cola,stsb", ",".join(ARMS), "runs/fish_tuning")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--fisher-warmup", type=int, default=30)
    args = parser.parse_args()
    run_sweep(parser, args, ARMS, run_one, "fish_tuning")


if __name__ == "__main__":
    main()
