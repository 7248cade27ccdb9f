"""SST-2 dev accuracy of LoRA r=8, random SHiRA and Fisher SHiRA over the learning-rate grid, with each run's commit.

    python benchmarks/shira_lr_summary.py --out docs/results/shira_quality_sst2_lr.json

Reads the run folders the sweeps of docs/fish_tuning.md#shira wrote (``fish_tuning_quality.py --lr LR
--out runs/shira_lrLR``; the 1e-3 sweep in ``runs/shira``); each run's ``provenance.json`` gives its commit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, write_json  # noqa: E402

FOLDERS = {"3e-4": "shira_lr3e-4", "1e-3": "shira", "3e-3": "shira_lr3e-3", "1e-2": "shira_lr1e-2"}
ARMS = ("lora-r8", "shira-r8-random", "shira-r8-fisher")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default="docs/results/shira_quality_sst2_lr.json")
    args = parser.parse_args()
    table: dict = {}
    for arm in ARMS:
        for lr, folder in FOLDERS.items():
            for seed in range(3):
                run = Path(args.runs, folder, "sst2", arm, f"seed{seed}")
                if not (run / "results.json").is_file():
                    continue
                result = json.loads((run / "results.json").read_text())
                origin = json.loads((run / "provenance.json").read_text()) if (run / "provenance.json").is_file() else {}
                table.setdefault(arm, {}).setdefault(lr, {})[seed] = {
                    "dev_accuracy": 100 * result["metrics"]["validation"]["accuracy"],
                    "train_loss": result["train_loss"], "train_peak_rss_mb": result["train_peak_rss_mb"],
                    "train_seconds": result["train_seconds"], "commit": origin.get("commit"),
                    "dirty": origin.get("dirty"), "recorded_after_run": origin.get("recorded_after_run", False)}
    write_json(args.out, {"provenance": provenance(), "note": "SST-2 dev accuracy x100 by arm, learning rate, seed",
                          "runs": table})


if __name__ == "__main__":
    main()
