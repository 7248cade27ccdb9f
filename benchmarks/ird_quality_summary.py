"""Which round IRD picked in each quality run, by what criterion values, and the accuracy against the plain
FISH mask from the same samples (the `fish-768` / `ird-768` arms of benchmarks/quality.py).

    python benchmarks/quality.py --tasks sst2 --methods fish-768,ird-768 --epochs 2 --out runs/quality_probe
    python benchmarks/ird_quality_summary.py --runs runs/quality_probe --out docs/results/ird_quality_probe_sst2.json

Reads each run's results.json, provenance.json and ird_report.json; writes one JSON with every seed's
picked round, the rounds' criterion values and overlaps with the FISH mask, both arms' metric per seed
and the paired difference (IRD - FISH on the same seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import METRIC, provenance, write_json  # noqa: E402


def _metric(run: Path, task: str) -> float:
    metrics = json.loads((run / "results.json").read_text())["metrics"]["validation"]
    return 100 * metrics[METRIC[task]]


def summarise(runs: Path, task: str, fish_arm: str, ird_arm: str) -> dict:
    seeds = sorted(int(p.name[4:]) for p in (runs / task / ird_arm).glob("seed*") if (p / "results.json").is_file())
    rows = []
    for seed in seeds:
        ird_run, fish_run = runs / task / ird_arm / f"seed{seed}", runs / task / fish_arm / f"seed{seed}"
        report = json.loads((ird_run / "ird_report.json").read_text())
        row = {"seed": seed, "picked_round": report["best_round"], "criterion": report["config"].get("criterion"),
               "round_criteria": [r["criterion"] for r in report["rounds"]],
               "round_overlap_with_fish": [r["overlap_with_fish"] for r in report["rounds"]],
               "search_seconds": report["seconds"], "ird": _metric(ird_run, task),
               "commit": json.loads((ird_run / "provenance.json").read_text())["commit"]}
        if (fish_run / "results.json").is_file():
            row["fish"] = _metric(fish_run, task)
            row["ird_minus_fish"] = row["ird"] - row["fish"]
        rows.append(row)

    def mean_std(key):
        values = [r[key] for r in rows if key in r]
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values)} if values else None

    return {"task": task, "metric": METRIC[task], "seeds": rows, "ird": mean_std("ird"), "fish": mean_std("fish"),
            "ird_minus_fish": mean_std("ird_minus_fish"),
            "picked_rounds": [r["picked_round"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/quality_probe")
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--fish-arm", default="fish-768")
    parser.add_argument("--ird-arm", default="ird-768")
    parser.add_argument("--out", default="docs/results/ird_quality_probe_sst2.json")
    args = parser.parse_args()
    tasks = {task: summarise(Path(args.runs), task, args.fish_arm, args.ird_arm) for task in args.tasks.split(",")}
    write_json(args.out, {"provenance": provenance(sys.argv), "args": vars(args), "tasks": tasks})
    for task, table in tasks.items():
        print(task, "picked rounds", table["picked_rounds"], "IRD", table["ird"], "FISH", table["fish"],
              "paired", table["ird_minus_fish"])


if __name__ == "__main__":
    main()
