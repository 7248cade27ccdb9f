"""Each method's default learning rate, from every task it can be checked on (issue 25, item 4).

    python benchmarks/lr_defaults.py --tasks sst2,cola,rte,stsb --out runs/lr_defaults          # train (resumes)
    python benchmarks/lr_defaults.py --tasks sst2,cola,rte,stsb --out runs/lr_defaults --summary-only \\
        --write docs/results/lr_defaults.json

MiniLM (the packaged checkpoint) on the GLUE tasks of ../shared, each method as the CLI runs it by default
(``--method full``, ``--method lora`` at r=8 on query/value, FISH at LoRA r=8's count as in the SST-2 screen),
at every point of its family's ladder (benchmarks/selection_screen.py's ``GRIDS``; the same protocol: at most
4,000 training rows, 2 epochs, batch 32, seed 0, sequences <= 64): the same command lines as the screen, so
OUT/sst2 may be the screen's own run folder. SmolLM2-135M's social_iqa points come from the LLM sweep
(docs/results/llm, its own protocol and grids) and are shown beside, at the rates both grids share.

The table: per task, each rate's validation score relative to the best rate of that method on that task
(1.0 = the best; STS-B: Pearson, CoLA: Matthews, else accuracy). A default should be good everywhere, so the
rate with the best *worst case* over the tasks is chosen, ties to the best mean rank. A task where no rate beats
chance by two standard errors (MiniLM learns nothing there) cannot rank rates and is left out of the choice. Nothing
here reads a test set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, write_json  # noqa: E402
from selection_screen import ARMS, GRIDS, _run_point, add_protocol_arguments  # noqa: E402

METHODS = {"full": "full", "lora": "lora-r8", "mask": "fish", "random": "random"}  # family -> the screen's arm for it
PRIMARY = {"cola": "matthews_correlation", "stsb": "pearson"}


def score(task: str, result: dict) -> float:
    return result["metrics"]["validation"][PRIMARY.get(task, "accuracy")]


def curve(task: str, result: dict) -> list[float]:
    """The validation score after each epoch (runs with --validation-curve), else []."""
    metric = PRIMARY.get(task, "accuracy")
    return [point[metric] for point in result.get("validation_log") or [] if metric in point]


def still_rising(scores: list[float], margin: float = 0.005) -> bool:
    """Whether the last epoch still added more than ``margin`` to the validation score: a run that may not have
    converged when it stopped."""
    return len(scores) >= 2 and scores[-1] - scores[-2] > margin


def chance_bar(task: str, glue_dir: str) -> float:
    """What a rate must beat for the task to say anything: chance (the majority class's validation accuracy, or a
    correlation of 0) plus two standard errors on the validation set's size. A task no rate clears this bar on
    (MiniLM learns nothing) cannot rank rates and is left out of the choice."""
    from sparsepeft.data import load_glue

    labels = list(load_glue(task, glue_dir).evaluation["validation"].labels)
    n = len(labels)
    if task in PRIMARY:  # a correlation: chance 0, standard error about 1/sqrt(n)
        return 2 / n ** 0.5
    majority = max(labels.count(v) for v in set(labels)) / n
    return majority + 2 * (majority * (1 - majority) / n) ** 0.5


# Each family's arm in the LLM sweep (benchmarks/llm_quality.py), or None where it has none. The nearest, not the
# same: its "fish" keeps 0.5% of the weights (not LoRA r=8's count) and its LoRA adapts q, k, v, o, up and down of a
# block. Random entries have none: that sweep's "random" arm is IST's baseline (LoRA on uniformly drawn blocks,
# --layers random), not a random mask, and its random-linear-lora8 draws from the linear weights only.
LLM_ARMS = {"full": "full", "lora": "lora", "mask": "fish", "random": None}


def llm_points(folder: Path, family: str) -> dict[float, float]:
    """social_iqa points (SmolLM2, seed 0) of the LLM sweep's arm for this family (none where it has no arm)."""
    arm = LLM_ARMS[family]
    if arm is None:
        return {}
    points = {}
    for path in folder.glob(f"{arm}_lr*_seed0.json"):
        run = json.loads(path.read_text())
        points[float(run["learning_rate"])] = run["metrics"]["validation"]["acc"]
    return points


def choose(by_task: dict[str, dict[float, float]], ladder: tuple, bars: dict[str, float]) -> tuple[str, dict]:
    """Relative scores, worst case and mean rank per rate over the tasks that ran every ladder point and that some
    rate learned (its best above the task's chance bar)."""
    complete = {t: pts for t, pts in by_task.items() if all(lr in pts for lr in ladder)
                and max(pts.values()) > bars.get(t, float("-inf"))}
    rows = {}
    for lr in ladder:
        relative = {t: pts[lr] / max(pts.values()) if max(pts.values()) > 0 else 0.0 for t, pts in complete.items()}
        ranks = {t: 1 + sum(v > pts[lr] for v in pts.values()) for t, pts in ((t, {x: p[x] for x in ladder})
                                                                               for t, p in complete.items())}
        rows[lr] = {"relative": relative, "worst": min(relative.values(), default=None),
                    "mean_rank": sum(ranks.values()) / len(ranks) if ranks else None}
    usable = [lr for lr in ladder if rows[lr]["worst"] is not None]
    chosen = max(usable, key=lambda lr: (rows[lr]["worst"], -rows[lr]["mean_rank"])) if usable else None
    return chosen, {"tasks": sorted(complete), "left_out": sorted(set(by_task) - set(complete)),
                    "rates": rows, "chosen": chosen}


def _label(task: str, points: dict) -> str:
    """A table row: the task, its runs' step count (which tells two protocols' rows apart) and, where more than
    one seed ran, how many."""
    runs = [r for by_seed in points.values() for r in by_seed.values()]
    steps = sorted({r["train_steps"] for r in runs})
    seeds = max((len(by_seed) for by_seed in points.values()), default=0)
    notes = ([f"{'/'.join(map(str, steps))} steps"] if steps else []) + ([f"{seeds} seeds"] if seeds > 1 else [])
    return f"minilm/{task}" + (f" ({', '.join(notes)})" if notes else "")


def _mean_curve(task: str, by_seed: dict) -> list[float]:
    """The validation curve averaged over the seeds that logged one (epoch by epoch)."""
    curves = [c for r in by_seed.values() if (c := curve(task, r))]
    return [sum(c[i] for c in curves) / len(curves) for i in range(min(map(len, curves)))] if curves else []


def _cell(points: dict, spread: dict, lr: float, top: float) -> str:
    """A rate's mean score, its ratio to the task's best and, over several seeds, their standard deviation."""
    if lr not in points:
        return "—"
    values = spread.get(lr, [])
    std = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{points[lr]:.3f}{std} ({points[lr] / top:.2f})" if top > 0 else f"{points[lr]:.3f}{std}"


def _points_by_seed(run_args: argparse.Namespace, arm: str, ladder: tuple, seeds: list[int], only: set) -> dict:
    """{lr: {seed: result}} of every point that ran (or, without --summary-only, now runs); the others left out."""
    points: dict = {}
    summary_only = run_args.summary_only
    for seed in seeds:
        run_args.seed = seed
        for lr in ladder:
            run_args.summary_only = summary_only or bool(only and lr not in only)
            one: dict = {}
            _run_point(run_args, arm, lr, one)
            if lr in one:
                points.setdefault(lr, {})[seed] = one[lr]
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", default="../shared/data/glue")
    parser.add_argument("--tasks", default="sst2,cola,rte,stsb")
    parser.add_argument("--families", default="lora,mask,full", help="in the order they run")
    parser.add_argument("--llm", default="docs/results/llm", help="the LLM sweep's run files (social_iqa)")
    add_protocol_arguments(parser)
    parser.add_argument("--out", default="runs/lr_defaults")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--rates", default="", help="train only these points of each ladder (e.g. two workers "
                        "splitting a sweep); the table still needs every point")
    parser.add_argument("--also", default="", help="TASK@FOLDER,...: finished runs of another protocol's sweep "
                        "(nothing is trained), shown and chosen on beside this one's, labelled with their step count")
    parser.add_argument("--seeds", default="", help="train and tabulate these seeds (e.g. 0,1,2): each cell is "
                        "their mean ± std and the choice is made on the means; default: --seed alone")
    parser.add_argument("--write")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s] or [args.seed]
    only = {float(r) for r in args.rates.split(",") if r}
    families = args.families.split(",")
    measured: dict = {f: {} for f in families}
    curves: dict = {f: {} for f in families}
    task_of: dict = {}  # row label -> GLUE task
    rows: list = []  # (family, task, {lr: result}) of every GLUE row, this sweep's and --also's
    for family in families:  # one task at a time, every rate: a stopped sweep leaves whole tasks behind
        arm = METHODS[family]
        for task in args.tasks.split(","):
            run_args = argparse.Namespace(**{**vars(args), "out": str(Path(args.out) / task)}, task=task)
            rows.append((family, task, _points_by_seed(run_args, arm, GRIDS[family], seeds, only)))
        for spec in filter(None, args.also.split(",")):  # another protocol's finished runs: read, never trained
            task, folder = spec.split("@")
            other = argparse.Namespace(**{**vars(args), "summary_only": True, "out": str(Path(folder) / task)},
                                       task=task)
            rows.append((family, task, _points_by_seed(other, arm, GRIDS[family], seeds, set())))
    spread: dict = {f: {} for f in families}  # every seed's score, behind each mean
    for family, task, points in rows:
        label = _label(task, points)
        spread[family][label] = {lr: [score(task, r) for r in by_seed.values()] for lr, by_seed in points.items()}
        measured[family][label] = {lr: statistics.mean(values) for lr, values in spread[family][label].items()}
        curves[family][label] = {lr: _mean_curve(task, by_seed) for lr, by_seed in points.items()}
        task_of[label] = task
    for family in families:
        social = llm_points(Path(args.llm), family)
        if social:
            measured[family]["smollm2/social_iqa"] = social
    bars = {label: chance_bar(task, args.glue_dir) for label, task in task_of.items()}
    # social_iqa's validation part (seed 0): 195 three-way questions (docs/llm.md), chance 1/3
    bars["smollm2/social_iqa"] = 1 / 3 + 2 * ((1 / 3) * (2 / 3) / 195) ** 0.5
    lines, summary = [], {}
    for family in families:
        ladder = GRIDS[family]
        chosen, detail = choose(measured[family], ladder, bars)
        summary[family] = {"arm": ARMS[METHODS[family]][1], "ladder": ladder, "by_task": measured[family],
                           "by_task_seeds": spread[family], "seeds": seeds, "validation_curves": curves[family],
                           "chance_bars": bars, **detail}
        over = f" (mean ± std over seeds {','.join(map(str, seeds))} where they ran)" if len(seeds) > 1 else ""
        lines += ["", f"**{family}** ({' '.join(ARMS[METHODS[family]][1])}): validation score{over} relative to the "
                  f"task's best rate; chosen: {chosen}" + ("; ↑: above chance and still rising (the last "
                  "epoch added more than 0.005 on validation)" if any(c for t in curves[family].values() for c in t.values()) else ""), "",
                  "| task | " + " | ".join(f"{lr:g}" for lr in ladder) + " | chance bar | in the choice |",
                  "|" + " --- |" * (len(ladder) + 3)]
        for task, pts in sorted(measured[family].items()):
            top = max(pts.values()) if pts else 0
            cells = [_cell(pts, spread[family].get(task, {}), lr, top)
                     + (" ↑" if lr in pts and pts[lr] > bars.get(task, float("-inf"))
                        and still_rising(curves[family].get(task, {}).get(lr, [])) else "") for lr in ladder]
            bar = f"{bars[task]:.3f}" if task in bars else "—"
            lines.append(f"| {task} | " + " | ".join(cells) + f" | {bar} | {'yes' if task in detail['tasks'] else 'no'} |")
        worst = [f"{detail['rates'][lr]['worst']:.2f}" if detail["rates"][lr]["worst"] is not None else "—"
                 for lr in ladder]
        lines.append("| worst case over the tasks in the choice | " + " | ".join(worst) + " | | |")
    markdown = "\n".join(lines)
    print(markdown)
    if args.write:
        write_json(args.write, {"provenance": provenance(), "args": vars(args), "families": summary,
                                "markdown": markdown})


if __name__ == "__main__":
    main()
