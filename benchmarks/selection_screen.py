"""Which full-model sparse selection earns its place: every variant at exactly LoRA r=8's trainable count.

    python benchmarks/selection_screen.py --out runs/selection_screen            # train (resumes)
    python benchmarks/selection_screen.py --out runs/selection_screen --summary-only \
        --write docs/results/selection_screen_sst2.json
    python benchmarks/selection_screen.py --arms lora-r8,random-linear,fish,full,taylor-linear \
        --rates-from docs/results/selection_screen_sst2.json --epochs 4 --validation-curve \
        --out runs/screen_4ep        # the convergence check: twice the steps at each arm's chosen rate
    python benchmarks/selection_screen.py --combine-seeds seed0.json,seed1.json --write combined.json
                                     # one --write file per --seed: mean ± std and paired tests over the seeds

SST-2 with the packaged MiniLM on the CPU. Every arm is one `sparsepeft train` command line; each arm is run
at every rate of its family's grid (the same number of points for every arm, spaced alike around the
family's default) and reported at its best rate on the dev set, with every point in the result file. The
sparse arms all keep exactly `lora:r=8` entries (74,498 on MiniLM, the head included), so they differ only
in *which* entries they train. Runs that already have a results.json are skipped: the sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import glue_train_command, mcnemar, mcnemar_p, provenance, train_once, write_json  # noqa: E402

EQUAL = ["--budget", "lora:r=8"]
RESELECT = "-reselect"  # an arm named X-reselect is X with re-selection during training, and is also tested against X
ARMS = {  # name: (learning-rate family, flags)
    "full": ("full", ["--method", "full"]),
    "lora-r8": ("lora", ["--method", "lora", "--lora-r", "8", "--target-modules", "query,value"]),
    "fish": ("mask", ["--method", "fish", *EQUAL]),  # as shipped: global Fisher over every weight
    "fish-per-block": ("mask", ["--method", "fish", *EQUAL, "--selection-strategy", "per_block"]),
    "fish-linear": ("mask", ["--method", "fish", *EQUAL, "--candidates", "linear"]),
    "fish-no-pooler": ("mask", ["--method", "fish", *EQUAL, "--candidates", "!pooler"]),
    "fish-linear-per-tensor": ("mask", ["--method", "fish", *EQUAL, "--candidates", "linear",
                                        "--selection-strategy", "per_tensor"]),
    "fish-linear-per-block": ("mask", ["--method", "fish", *EQUAL, "--candidates", "linear",
                                       "--selection-strategy", "per_block"]),
    "gradient-linear": ("mask", ["--method", "fish", *EQUAL, "--candidates", "linear", "--importance", "gradient"]),
    "taylor-linear": ("mask", ["--method", "fish", *EQUAL, "--candidates", "linear", "--importance", "taylor"]),
    "magnitude-linear": ("mask", ["--method", "fish", *EQUAL, "--candidates", "linear", "--importance", "magnitude"]),
    "fish-warmup": ("mask", ["--method", "fish", *EQUAL, "--fisher-at", "warmup"]),
    "random-linear": ("mask", ["--method", "random", *EQUAL, "--candidates", "linear"]),
    "random": ("random", ["--method", "random", *EQUAL]),  # the CLI's random baseline, for its default rate
    # re-selection during training with SpIEL's schedule (every 20 steps, 5 steps of gradients, 20% at first),
    # from FISH as shipped's mask, and from random entries of the linear weights (SpIEL's own start is random)
    "fish-reselect": ("mask", ["--method", "fish", *EQUAL, "--reselect-every", "20"]),
    "random-linear-reselect": ("mask", ["--method", "random", *EQUAL, "--candidates", "linear",
                                        "--reselect-every", "20"]),
}
# Each family's ladder of rates, spaced alike (x2-x3). Every arm runs the two middle points (its family's usual
# rate and the next up); an arm whose best is at an end of what it ran goes one step further that way (the edge
# rule), the same rule for every arm.
# Random entries: the mask ladder moved one step up, since they did best at its top on SST-2 (docs/selection.md),
# and one point longer (4e-2), since their default's choice found the best at 2e-2 on STS-B and CoLA.
GRIDS = {"full": (2e-5, 5e-5, 1e-4, 2e-4), "lora": (3e-4, 1e-3, 3e-3, 1e-2), "mask": (1e-3, 2e-3, 5e-3, 1e-2),
         "random": (2e-3, 5e-3, 1e-2, 2e-2, 4e-2)}


def run_one(args, arm: str, lr: float, seed: int) -> dict | None:
    family, flags = ARMS[arm]
    out = Path(args.out) / arm / f"lr{lr:g}" / f"seed{seed}"
    command = glue_train_command(getattr(args, "task", "sst2"), args.glue_dir, out, seed, max_train=args.max_train_samples,
                                 max_len=args.max_seq_length, lr=lr, epochs=args.epochs,
                                 batch_size=args.batch_size, warmup_steps=args.warmup_steps)
    command += ["--num-samples", str(args.num_samples), *flags]
    if args.validation_curve:  # the validation score after each epoch: did the run converge?
        command += ["--eval-strategy", "epoch", "--logging-strategy", "epoch"]
    return train_once(command, out, f"{arm} lr {lr:g} seed {seed}", args.summary_only)


def _run_point(args, arm: str, lr: float, points: dict) -> None:
    try:
        points[lr] = run_one(args, arm, lr, args.seed)
    except Exception as error:  # one failed arm must not stop the sweep; its log says why
        print(f"  {arm} lr {lr:g}: failed ({error})", flush=True)
        points[lr] = None
    if points[lr] is None:
        del points[lr]


def _edge_step(points: dict, ladder: tuple) -> float | None:
    """The next rate beyond the end of the ladder's run points where the best lies, if the ladder has one."""
    scores = {lr: r["metrics"]["validation"]["accuracy"] for lr, r in points.items()}
    if len(scores) < 2:
        return None
    best = max(scores, key=scores.get)
    i = ladder.index(best)
    if best == max(scores) and i + 1 < len(ladder):
        return ladder[i + 1]
    if best == min(scores) and i > 0:
        return ladder[i - 1]
    return None


def dev_predictions(folder: Path, glue_dir: str, max_len: int) -> tuple[list[int], list[int]]:
    """The saved model's (or adapter's) predictions on SST-2's dev rows, and the labels: what a paired test needs.
    Checked against the accuracy the run reported."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsepeft.data import load_glue

    split = load_glue("sst2", glue_dir).evaluation["validation"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.eval()
    texts = [t[0] for t in split.texts]
    predictions = []
    with torch.no_grad():
        for start in range(0, len(texts), 128):
            batch = tokenizer(texts[start:start + 128], truncation=True, max_length=max_len, padding=True,
                              return_tensors="pt")
            predictions += model(**batch).logits.argmax(-1).tolist()
    return predictions, list(split.labels)


def paired_tests(args, table: dict, references=("lora-r8", "fish")) -> tuple[str, dict]:
    """Each arm at its best rate against LoRA r=8 and FISH as shipped, question by question on the dev set:
    exact McNemar test on the sentences only one of the two gets right."""
    hits = {}
    for arm, row in table.items():
        folder = Path(args.out) / arm / f"lr{row['best_lr']:g}" / f"seed{args.seed}"
        predictions, labels = dev_predictions(folder, args.glue_dir, args.max_seq_length)
        hits[arm] = [p == y for p, y in zip(predictions, labels)]
        accuracy = 100 * sum(hits[arm]) / len(labels)
        if abs(accuracy - row["accuracy"]) > 1e-6:
            raise SystemExit(f"{folder}: the saved model scores {accuracy:.4f}, its run reported {row['accuracy']:.4f}")
    lines = ["| arm | against | diff (points) | only arm right / only reference right | McNemar p |",
             "| --- | --- | --- | --- | --- |"]
    out = {}
    pairs = [(arm, reference) for reference in references for arm in table if arm != reference and reference in hits]
    pairs += [(arm, arm[:-len(RESELECT)]) for arm in table  # a re-selecting arm against its fixed-mask twin
              if arm.endswith(RESELECT) and arm[:-len(RESELECT)] in hits and arm[:-len(RESELECT)] not in references]
    for arm, reference in pairs:
        test = mcnemar(hits[arm], hits[reference])
        out[f"{arm}_vs_{reference}"] = {"diff": test["diff"], "only_arm_right": test["only_arm_right"],
                                        "only_reference_right": test["only_reference_right"], "p": test["mcnemar_p"]}
        lines.append(f"| {arm} | {reference} | {test['diff']:+.2f} | {test['only_arm_right']} / "
                     f"{test['only_reference_right']} | {test['mcnemar_p']:.3f} |")
    return "\n".join(lines), out


def summarise(results: dict) -> tuple[str, dict]:
    """Each arm at its best rate (dev accuracy x100, one seed), beside every point of its grid."""
    table: dict = {}
    lines = ["| arm | best lr | dev accuracy | every lr | after each epoch | trainable | tensors with entries | "
             "top tensor's share | train s |", "|" + " --- |" * 9]
    for arm, by_lr in results.items():
        points = {lr: r for lr, r in by_lr.items() if r is not None}
        if not points:
            continue
        scores = {lr: 100 * r["metrics"]["validation"]["accuracy"] for lr, r in points.items()}
        best = max(scores, key=scores.get)
        run = points[best]
        allocation = (run.get("mask_allocation") or {})
        top = (allocation.get("top_tensors") or [{}])[0]
        table[arm] = {"best_lr": best, "accuracy": scores[best], "by_lr": scores,
                      "trainable_params": run["trainable_params"], "train_seconds": run["train_seconds"],
                      "selection": run.get("selection"), "allocation": allocation or None,
                      "validation_curve": [100 * v["accuracy"] for v in run.get("validation_log") or []
                                           if "accuracy" in v],
                      "commits": sorted({(r.get("provenance") or {}).get("commit") or "unrecorded"
                                         for r in points.values()})}
        every = ", ".join(f"{lr:g}: {s:.2f}" for lr, s in sorted(scores.items()))
        share = f"{100 * top['share']:.0f}% {top['name']}" if top else "—"
        tensors = f"{allocation.get('tensors_with_entries')}/{allocation.get('candidate_tensors')}" if allocation else "—"
        epochs = " · ".join(f"{v:.2f}" for v in table[arm]["validation_curve"]) or "—"
        lines.append(f"| {arm} | {best:g} | {scores[best]:.2f} | {every} | {epochs} | {run['trainable_params']:,} | "
                     f"{tensors} | {share} | {run['train_seconds']:.0f} |")
    return "\n".join(lines), table


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """The training protocol every MiniLM/GLUE sweep here shares (the screen, benchmarks/lr_defaults.py)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-samples", type=int, default=4000)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--validation-curve", action="store_true",
                        help="evaluate on validation after every epoch (results.json validation_log): convergence")


def chosen_rates(path: str, arms: list[str]) -> dict[str, float]:
    """Each arm's best rate in an earlier screen's result file (its ``--write``): the convergence check reruns the
    arms longer at the rates the screen chose, so it needs every asked-for arm there; found before any training."""
    table = {}  # several files (comma-separated): a later screen of new arms beside the first one's
    for one in path.split(","):
        table.update(json.loads(Path(one).read_text())["table"])
    missing = [arm for arm in arms if arm not in table]
    if missing:
        raise SystemExit(f"--rates-from {path}: no chosen rate for the arms {missing}; it has {sorted(table)}. "
                         "Drop them from --arms or screen them first.")
    return {arm: float(table[arm]["best_lr"]) for arm in arms}


PROTOCOL_KEYS = ("glue_dir", "max_train_samples", "max_seq_length", "epochs", "batch_size", "warmup_steps",
                 "num_samples")


def load_seed_files(paths: list[str]) -> list[dict]:
    """Per-seed result files (one ``--write`` each) that can be pooled: the same protocol and each arm at the same
    rate, different seeds. Anything else is refused, naming the file and the field, before any figure is made."""
    files = [json.loads(Path(path).read_text()) for path in paths]
    for data, path in zip(files, paths):
        if "grids" not in data or "paired" not in data:  # a pooled file, or another benchmark's
            raise SystemExit(f"--combine-seeds: {path} is not one seed's --write file of this screen")
    if len(files) < 2:
        raise SystemExit("--combine-seeds needs at least two result files, one per seed, separated by commas")
    first, first_path = files[0], paths[0]
    seeds = [f["args"]["seed"] for f in files]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--combine-seeds: the files {paths} repeat a seed ({seeds}); each must be its own --seed")
    for data, path in zip(files[1:], paths[1:]):
        for key in PROTOCOL_KEYS:
            if data["args"].get(key) != first["args"].get(key):
                raise SystemExit(f"--combine-seeds: {path} ran with {key}={data['args'].get(key)!r}, {first_path} "
                                 f"with {first['args'].get(key)!r}; only runs of one protocol can be pooled")
        for arm, row in data["table"].items():
            if arm in first["table"] and row["best_lr"] != first["table"][arm]["best_lr"]:
                raise SystemExit(f"--combine-seeds: {arm} ran at lr {row['best_lr']:g} in {path} and at "
                                 f"{first['table'][arm]['best_lr']:g} in {first_path}; run every seed at one rate "
                                 "(--rates-from)")
    return files


def combine_seeds(files: list[dict]) -> tuple[str, dict, dict]:
    """Mean ± sample std of each arm's dev accuracy over the seeds, and each pair's tests: McNemar per seed and
    pooled (the sentences only one of the two runs gets right, summed over the seeds, against a fair coin), which
    see the dev set's sampling noise, and a paired t-test over the seeds' accuracy differences, which sees the
    training seed's."""
    from scipy.stats import ttest_rel

    seeds = [f["args"]["seed"] for f in files]
    arms = [arm for arm in files[0]["table"] if all(arm in f["table"] for f in files)]
    table = {}
    lines = [f"| arm | lr | dev accuracy, mean ± std over seeds {', '.join(map(str, seeds))} | each seed | "
             "after each epoch (mean over seeds) |", "|" + " --- |" * 5]
    for arm in arms:
        scores = [f["table"][arm]["accuracy"] for f in files]
        curves = [f["table"][arm].get("validation_curve") or [] for f in files]
        curve = ([statistics.mean(c[i] for c in curves) for i in range(min(map(len, curves)))]
                 if all(curves) else [])
        table[arm] = {"lr": files[0]["table"][arm]["best_lr"], "mean": statistics.mean(scores),
                      "std": statistics.stdev(scores), "by_seed": dict(zip(map(str, seeds), scores)),
                      "mean_validation_curve": curve}
        lines.append(f"| {arm} | {table[arm]['lr']:g} | {table[arm]['mean']:.2f} ± {table[arm]['std']:.2f} | "
                     f"{' · '.join(f'{s:.2f}' for s in scores)} | {' · '.join(f'{v:.2f}' for v in curve) or '—'} |")
    paired = {}
    pair_lines = ["| arm | against | diff, mean over seeds | each seed: diff (p) | only arm right / only reference "
                  "right, summed | pooled McNemar p | paired t over seeds: t (p) |", "|" + " --- |" * 7]
    for key in files[0]["paired"]:
        if not all(key in f["paired"] for f in files):
            continue
        per_seed = [f["paired"][key] for f in files]
        ours = sum(t["only_arm_right"] for t in per_seed)
        theirs = sum(t["only_reference_right"] for t in per_seed)
        pooled_p = mcnemar_p(ours, theirs)
        arm, reference = key.split("_vs_")
        over_seeds = ttest_rel([table[arm]["by_seed"][str(s)] for s in seeds],
                               [table[reference]["by_seed"][str(s)] for s in seeds])
        paired[key] = {"diff_mean": statistics.mean(t["diff"] for t in per_seed),
                       "by_seed": dict(zip(map(str, seeds), per_seed)), "only_arm_right": ours,
                       "only_reference_right": theirs, "pooled_p": pooled_p,
                       "seeds_t": float(over_seeds.statistic), "seeds_p": float(over_seeds.pvalue)}
        each = " · ".join(f"{t['diff']:+.2f} ({t['p']:.3f})" for t in per_seed)
        pair_lines.append(f"| {arm} | {reference} | {paired[key]['diff_mean']:+.2f} | {each} | {ours} / {theirs} | "
                          f"{pooled_p:.3g} | {over_seeds.statistic:.2f} ({over_seeds.pvalue:.3f}) |")
    markdown = "\n".join(lines) + "\n\nQuestion by question on the dev set, per seed and pooled over the seeds:\n\n" \
        + "\n".join(pair_lines)
    return markdown, table, paired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", default="../shared/data/glue")
    parser.add_argument("--arms", default=",".join(ARMS))
    add_protocol_arguments(parser)
    parser.add_argument("--out", default="runs/selection_screen")
    parser.add_argument("--summary-only", action="store_true", help="tabulate the runs that exist; train nothing")
    parser.add_argument("--write", help="also write the table and every run's figures to this JSON file")
    parser.add_argument("--combine-seeds", help="comma-separated --write files of one protocol, one per --seed: "
                        "tabulate mean ± std and paired tests over the seeds (trains nothing)")
    parser.add_argument("--rates-from", help="an earlier screen's --write file (or several, comma-separated): run "
                        "each arm only at the rate it chose there (with more --epochs and --validation-curve: did the "
                        "screen's budget converge?)")
    args = parser.parse_args()
    if args.combine_seeds:
        paths = args.combine_seeds.split(",")
        markdown, table, paired = combine_seeds(load_seed_files(paths))
        print(markdown)
        if args.write:
            write_json(args.write, {"provenance": provenance(), "args": vars(args), "seed_files": paths,
                                    "table": table, "paired": paired, "markdown": markdown})
        return
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    chosen = chosen_rates(args.rates_from, arms) if args.rates_from else {}
    results: dict = {}
    for arm in arms:
        ladder = GRIDS[ARMS[arm][0]]
        points = results.setdefault(arm, {})
        if arm in chosen:  # a longer run at the rate an earlier screen chose: no grid, no edge step
            _run_point(args, arm, chosen[arm], points)
            continue
        for lr in ladder[1:3]:
            _run_point(args, arm, lr, points)
        edge = _edge_step(points, ladder)
        if edge is not None:
            _run_point(args, arm, edge, points)
    markdown, table = summarise(results)
    paired_markdown, paired = paired_tests(args, table)
    markdown += (f"\n\nQuestion by question on the dev set (seed {args.seed}, each arm at its best rate):\n\n"
                 + paired_markdown)
    print(markdown)
    if args.write:
        write_json(args.write, {"provenance": provenance(), "args": vars(args), "grids": GRIDS,
                                "arms": {a: ARMS[a][1] for a in arms}, "table": table, "paired": paired,
                                "markdown": markdown})


if __name__ == "__main__":
    main()
