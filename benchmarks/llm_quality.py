"""Every method against LoRA and full fine-tuning on a pretrained LLM: SmolLM2-135M-Instruct on BIG-bench
social_iqa (three-way multiple choice), the LLM track of docs/llm.md.

    pip install -e ".[llm]"
    python benchmarks/llm_quality.py --phase grid         # seed 0 at the three grid points of each arm
    python benchmarks/llm_quality.py --phase seeds        # seeds 1 and 2 at each arm's chosen rate
    python benchmarks/llm_quality.py --summary-only       # the table from the result files that exist

Protocol (the same for every arm): the fixed split of the file (seed 0: 1369 train / 195 validation /
390 test questions), prompt -> correct option with the loss on the answer tokens, --steps optimizer steps
of batch --batch-size (default 200 x 16 = 3200 examples, 2.3 epochs), linear decay after 20 warm-up steps,
sequences cut to 128 tokens. Each arm's learning rate is chosen on validation (seed 0, SELECT_ON: the mean
over the tasks of each task's balanced accuracy, which on social_iqa alone is its accuracy) from a
three-point grid that starts at its family's usual value and goes two half-decades up (the first grids,
centred on the usual value, all picked their upper edge at 200 steps); a grid whose best point is again
its upper edge moves up by one more half-decade, still three points, on the task where that happened (full FT:
3e-4 beat 1e-4; random entries on social_iqa alone, not on the suite). Test
accuracy is reported as mean ± std over the seeds run at that rate. Nothing is chosen on test. Points run
outside the grid (the lower points a grid moved past) are listed beside it, never chosen.

Each run writes one file, OUT/ARM_lrLR_seedS.json (results.json of the run + provenance: commit, package
versions, machine, command), and is skipped when that file exists: the sweep resumes after an
interruption and can run in pieces. The model folder of a run is deleted once its file is written.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import mcnemar, paired_weighted_test, provenance, write_json  # noqa: E402

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,up_proj,down_proj"  # IST's target set
LORA8_BUDGET = "lora:r=8,target_modules=" + LORA_TARGETS.replace(",", "+")  # the LoRA arm's trainable count
LORA8 = ["--method", "lora", "--lora-r", "8", "--lora-alpha", "16", "--target-modules", LORA_TARGETS]
ARMS = {  # arm -> (learning-rate family, flags)
    "zero-shot": (None, ["--method", "full", "--max-steps", "0"]),
    "full": ("full", ["--method", "full"]),
    "fish": ("mask", ["--method", "fish", "--keep-ratio", "0.005", "--engine", "sparse", "--always-train", ""]),
    "lora": ("lora", LORA8),
    "ist": ("lora", [*LORA8, "--layers", "ist"]),
    "random": ("lora", [*LORA8, "--layers", "random"]),
    "lisa": ("lora", [*LORA8, "--layers", "lisa"]),
    "lora-fish": ("lora", ["--method", "lora", "--lora-r", "16", "--lora-alpha", "32", "--target-modules",
                           LORA_TARGETS, "--fish", "--budget", "lora:r=8"]),
    # PEFT's SHiRA at LoRA r=8's count on the same targets: random entries, and each layer's top Fisher entries
    "shira-random": ("lora", ["--method", "shira", "--shira-r", "8", "--target-modules", LORA_TARGETS,
                              "--selection", "random"]),
    "shira-fisher": ("lora", ["--method", "shira", "--shira-r", "8", "--target-modules", LORA_TARGETS,
                              "--selection", "fisher"]),
    # full-model masks at exactly LoRA r=8's count (issue 25): the shipped selection, and the blocks' linear weights
    "fish-lora8": ("mask", ["--method", "fish", "--budget", LORA8_BUDGET, "--engine", "sparse", "--always-train", ""]),
    "fish-linear-lora8": ("mask", ["--method", "fish", "--budget", LORA8_BUDGET, "--candidates", "linear",
                                   "--engine", "sparse", "--always-train", ""]),
    # the two that spread the budget and led the SST-2 screen (docs/selection.md)
    "random-linear-lora8": ("mask", ["--method", "random", "--budget", LORA8_BUDGET, "--candidates", "linear",
                                     "--engine", "sparse", "--always-train", ""]),
    "taylor-linear-lora8": ("mask", ["--method", "fish", "--budget", LORA8_BUDGET, "--candidates", "linear",
                                     "--importance", "taylor", "--engine", "sparse", "--always-train", ""]),
    # FISH as shipped, re-selected during training with SpIEL's schedule (docs/selection.md, re-selection)
    "fish-lora8-reselect": ("mask", ["--method", "fish", "--budget", LORA8_BUDGET, "--engine", "sparse",
                                     "--always-train", "", "--reselect-every", "20"]),
    # an extra arm, never the default: does a larger score step make IST's scores (and quality) move?
    "ist-score-lr100": ("lora", [*LORA8, "--layers", "ist", "--ist-score-lr", "100"]),
    # LoRA r=8 without the CLI's default input dropout (0.1): each adapter then keeps no copy of its input
    "lora-nodropout": ("lora", [*LORA8, "--lora-dropout", "0"]),
    # the suite's length groups in random order instead of Trainer's longest-to-shortest within each mega-batch,
    # which trains the four tasks one after another (docs/selection.md); nothing else differs
    "lora-shuffled": ("lora", [*LORA8, "--shuffle-length-groups"]),
    "fish-lora8-shuffled": ("mask", ["--method", "fish", "--budget", LORA8_BUDGET, "--engine", "sparse",
                                     "--always-train", "", "--shuffle-length-groups"]),
    "random-linear-lora8-shuffled": ("mask", ["--method", "random", "--budget", LORA8_BUDGET, "--candidates",
                                              "linear", "--engine", "sparse", "--always-train", "",
                                              "--shuffle-length-groups"]),
    "full-shuffled": ("full", ["--method", "full", "--shuffle-length-groups"]),
    # LoRA r=8 shuffled at PEFT's default dropout (0): is the CLI's 0.1 what keeps LoRA from learning winowhy?
    "lora-nodropout-shuffled": ("lora", [*LORA8, "--lora-dropout", "0", "--shuffle-length-groups"]),
}
# Each family's usual rate, then two half-decades up: the first grids, centred on the usual rate, all picked
# their upper edge at 200 steps, so the search must reach above it. A grid whose best is again its upper edge
# moves up one more half-decade (full FT: 3e-4 beat 1e-4 and 3e-5). The same three points for every arm.
GRIDS = {"full": (1e-4, 3e-4, 1e-3), "mask": (3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2)}
OFF_GRID = {"full": (1e-5, 3e-5), "mask": (1e-4,), "lora": (3e-4,)}  # lower points a grid moved past: never chosen
# Arms whose own grid moved up by the rule above, on the task where the evidence came from. Random entries of the
# linear weights picked their upper edge on the social_iqa sweep (docs/results/llm, validation 38.97 / 40.51 /
# 43.08 at 3e-4 / 1e-3 / 3e-3), as random entries' best rates sit one step above Fisher masks' on MiniLM
# (docs/selection.md). On the suite the family's grid holds (1e-3 beat 3e-3 there), so every selection arm is
# searched over the same three points; the suite's earlier 1e-2 run is listed beside it, never chosen. In shuffled
# order the family's grid did not hold for random entries: their suite validation rose along all three points
# (50.25 / 51.25 / 52.30 at 3e-4 / 1e-3 / 3e-3, docs/results/llm_suite) and again to the moved grid's upper point
# (54.87 at 1e-2), so that arm's suite grid has moved up twice; its upper point, 3e-2, scored 50.02, so there the
# search is complete and chooses 1e-2, inside the grid.
COMMONSENSE_SUITE = "social_iqa,winowhy,timedial,epistemic_reasoning"
MOVED_GRIDS = {("random-linear-lora8", "social_iqa"): (1e-3, 3e-3, 1e-2),
               ("random-linear-lora8-shuffled", COMMONSENSE_SUITE): (3e-3, 1e-2, 3e-2)}


def grid_of(arm: str, task: str = "social_iqa", train_order: str = "trainer") -> tuple[float, ...]:
    """The three rates an arm's rate is chosen from on a task (or suite): its family's grid, or the grid the arm
    itself moved to there (``task`` as --task gives it: spaces around the commas do not matter). A grid moved in
    shuffled order is one arm's whichever way the order was asked for: a ``-shuffled`` arm, or the plain arm under
    ``--train-order shuffled`` (as benchmarks/gpu_suite.sh runs it)."""
    return MOVED_GRIDS.get((_as_trained(arm, train_order), _normalised(task)), GRIDS[ARMS[arm][0]])


def _as_trained(arm: str, train_order: str = "trainer") -> str:
    """The arm's name as MOVED_GRIDS keys it: under --train-order shuffled a plain arm is its -shuffled twin."""
    plain_arm = train_order != "shuffled" or SHUFFLED in ARMS[arm][1]
    return arm if plain_arm else f"{arm}-shuffled"


def _normalised(task: str) -> str:
    """--task with its names stripped and comma-joined, the form MOVED_GRIDS is keyed by."""
    from sparsepeft.data.tasks import task_names

    return ",".join(task_names(task))


def off_grid_of(arm: str, task: str = "social_iqa", train_order: str = "trainer") -> tuple[float, ...]:
    """Points an arm's grid moved past (its family's lower points, the family grid's points below a moved grid,
    and the points of the arm's grids moved on other tasks): listed beside the grid when run, never chosen."""
    family, name = ARMS[arm][0], _as_trained(arm, train_order)
    elsewhere = {lr for (moved, _), grid in MOVED_GRIDS.items() if moved == name for lr in grid}
    grid = grid_of(arm, task, train_order)
    return tuple(sorted(set(OFF_GRID[family]) | (set(GRIDS[family]) | elsewhere) - set(grid)))


# The rate rule's measure: the mean over the tasks of each task's balanced accuracy (balanced_weights in
# sparsepeft.data.multiple_choice). On social_iqa alone, whose questions each have their own options, it is
# lm-evaluation-harness's `acc` (summed log-likelihood). On the suite, where every trained run answered one of
# winowhy's or epistemic_reasoning's two answers to nearly every question, pooled accuracy rose and fell by
# ~5 points with which constant a run fell to (docs/selection.md); a constant answer scores exactly chance here.
SELECT_ON = "macro_balanced_acc"


def _task(args) -> str:
    """The run's task or suite (summaries built from a bare Namespace default to social_iqa)."""
    return getattr(args, "task", "social_iqa")


def _order(args) -> str:
    """--train-order (Trainer's unless given)."""
    return getattr(args, "train_order", "trainer")


def run_grid(args, arm: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The arm's grid and the points listed beside it, for this run's --task and --train-order."""
    return grid_of(arm, _task(args), _order(args)), off_grid_of(arm, _task(args), _order(args))


def _seeds(args) -> list[int]:
    """--seeds as numbers (1 and 2 unless given)."""
    return [int(s) for s in getattr(args, "seeds", "1,2").split(",")]


SHUFFLED = "--shuffle-length-groups"
TRAINER_ORDER, SHUFFLED_ORDER = "group_by_length", "group_by_length, shuffled batches"  # results.json's train_order


def expected_order(args, arm: str) -> str | None:
    """The train_order a run of this arm records under these arguments (None: one task, no length grouping)."""
    if not is_suite(args):
        return None
    shuffled = SHUFFLED in ARMS[arm][1] or _order(args) == "shuffled"
    return SHUFFLED_ORDER if shuffled else TRAINER_ORDER


def recorded_order(args, result: dict) -> str | None:
    """A run file's train_order; suite runs written before it was recorded all used Trainer's length grouping."""
    return result.get("train_order", TRAINER_ORDER if is_suite(args) else None)


def check_one_order(args, arm: str, order: str | None = None) -> None:
    """Refuse an arm whose runs in --out were trained in different orders (or in another order than ``order``, the
    one a new run would use): its grid and seeds would not be one protocol. Zero-shot trains nothing; one task's runs
    are not grouped by length (their files say "random", or nothing before train_order was recorded)."""
    if ARMS[arm][0] is None or not is_suite(args):
        return
    orders = {recorded_order(args, json.loads(path.read_text())) for path in Path(args.out).glob(f"{arm}_lr*_seed*.json")}
    if order is not None and orders and orders != {order}:
        raise SystemExit(f"{arm}: {args.out} holds its runs trained in order {sorted(orders)}, and this run would train in "
                         f"{order!r}: use another --out for the other order, or --train-order to match.")
    if len(orders) > 1:
        raise SystemExit(f"{arm}: {args.out} mixes runs trained in orders {sorted(orders)}; one arm's grid and seeds "
                         "must share one order: move one order's files to another folder.")


def is_suite(args) -> bool:
    """Several tasks (comma-separated): reported per task, batched by length, and headlined by SELECT_ON, which
    on one task is `acc` (so a single task's tables show accuracy alone)."""
    return "," in _task(args)


def run_name(arm: str, lr: float | None, seed: int) -> str:
    return f"{arm}_lr{lr:g}_seed{seed}" if lr is not None else arm


def command(args, arm: str, lr: float | None, seed: int, out: Path) -> list[str]:
    _, flags = ARMS[arm]
    line = [sys.executable, "-m", "sparsepeft", "train", "--model", args.model, "--task", args.task,
            "--data-dir", args.data_dir, "--max-seq-length", str(args.max_seq_length), "--per-device-train-batch-size",
            str(args.batch_size), "--per-device-eval-batch-size", "24", "--max-steps", str(args.steps),
            "--warmup-steps", str(args.warmup_steps), "--num-samples", str(args.fisher_samples),
            "--fisher-batch-size", "8", "--seed", str(seed), "--save-strategy", "no", "--logging-steps", "10",
            "--report-to", "none", "--disable-tqdm", "true", "--output-dir", str(out)]
    if lr is not None:
        line += ["--learning-rate", f"{lr:g}"]
    if is_suite(args):  # the suite mixes short prompts with timedial's long ones: batches of similar lengths
        line += ["--train_sampling_strategy", "group_by_length"]  # instead of padding nearly every batch to 256
        if _order(args) == "shuffled" and SHUFFLED not in flags:
            line.append(SHUFFLED)  # the same batches in random order (docs/selection.md, the suite's order)
    line += flags  # zero-shot's --max-steps 0 comes last and wins
    if args.smoke:
        # batches of 2: a suite's batch of 16 at 256 tokens holds ~12 GB on a CPU, and a smoke run checks wiring
        line += ["--max-steps", "0" if arm == "zero-shot" else "2", "--max-train-samples", "48",
                 "--per-device-train-batch-size", "2", "--per-device-eval-batch-size", "2",
                 "--max-eval-samples", "6", "--num-samples", "16", "--fisher-warmup-steps", "2",
                 "--ist-probe-interval", "1"]
    return line


def run_one(args, arm: str, lr: float | None, seed: int) -> dict | None:
    target = Path(args.out) / f"{run_name(arm, lr, seed)}.json"
    if target.is_file():
        return json.loads(target.read_text())
    if args.summary_only:
        return None
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f"{run_name(arm, lr, seed)}.", dir=args.scratch))
    line = command(args, arm, lr, seed, out)
    measured_on = provenance(line)  # taken before the run: the tree may move on while it trains
    start = time.time()
    with open(out / "train.log", "w") as log:
        finished = subprocess.run(line, stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        print(f"  {run_name(arm, lr, seed)} FAILED (exit {finished.returncode}); log: {out / 'train.log'}", flush=True)
        return None
    result = json.loads((out / "results.json").read_text())
    result["provenance"] = measured_on
    result["wall_seconds"] = time.time() - start
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(target)
    logs = Path(args.out) / "train_logs"  # Trainer's printed log: the loss curve of runs older than train_log
    logs.mkdir(exist_ok=True)
    shutil.copy(out / "train.log", logs / f"{run_name(arm, lr, seed)}.log")
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {run_name(arm, lr, seed)}: {time.time() - start:.0f}s  validation {result['metrics']['validation']}",
          flush=True)
    return result


def chosen_lr(args, arm: str) -> float | None:
    """The grid point with the best validation accuracy at seed 0 (the usual rate while none has run).

    195 validation questions make ties likely: they go to the higher acc_norm, then the lower answer NLL.
    """
    family, _ = ARMS[arm]
    if family is None:
        return None
    grid, _ = run_grid(args, arm)
    scored = [(_score(args, r, "validation"), (v := r["metrics"]["validation"])["acc_norm"], -v["answer_nll"], lr)
              for lr in grid if (r := _existing(args, arm, lr, 0)) is not None]
    return max(scored)[-1] if scored else grid[0]


def _recomputed(args, run: dict, split: str) -> dict | None:
    """A run's metrics on a split recomputed from its kept option scores with today's metrics (runs made before
    a metric existed have the scores it needs), or None for runs that kept none."""
    from sparsepeft.data.multiple_choice import choice_metrics_by_task

    scored = _scored_questions(args, run, split)
    return choice_metrics_by_task(*scored) if scored is not None else None


def _score(args, run: dict, split: str) -> float:
    """The rate rule's measure (SELECT_ON) of a run on a split. Runs older than its key recompute it from their
    option scores; social_iqa runs made before option scores were kept use `acc`, which it equals there."""
    metrics = run["metrics"][split]
    if SELECT_ON in metrics:
        return metrics[SELECT_ON]
    recomputed = _recomputed(args, run, split)
    if recomputed is not None:
        return recomputed[SELECT_ON]
    if _task(args) != "social_iqa":
        raise SystemExit(f"a run of {args.task} (lr {run.get('learning_rate')}, seed {run.get('seed')}) kept neither "
                         f"{split} {SELECT_ON} nor its option scores: rerun it with the current code")
    return metrics["acc"]


def _existing(args, arm: str, lr: float | None, seed: int) -> dict | None:
    path = Path(args.out) / f"{run_name(arm, lr, seed)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _has_results(args, arm: str) -> bool:
    out = Path(args.out)
    return (out / f"{arm}.json").is_file() or any(out.glob(f"{arm}_lr*_seed*.json"))


def grid_plan(args, arms: list[str]) -> list[tuple[str, float | None, int]]:
    """Seed 0 at each grid point (or at --lrs) of every arm; zero-shot once."""
    if args.phase not in ("grid", "all"):
        return []
    runs = []
    for arm in arms:
        family, _ = ARMS[arm]
        lrs = [float(lr) for lr in args.lrs.split(",")] if args.lrs else run_grid(args, arm)[0] if family else [None]
        runs += [(arm, lr, 0) for lr in lrs]
    return runs


def seeds_plan(args, arms: list[str]) -> list[tuple[str, float | None, int]]:
    """--seeds (1 and 2) of every trained arm at its chosen rate, seed by seed (every arm's seed 1 before any
    seed 2, so a sweep cut short leaves each arm with as many seeds as it could). The rate is read from the
    grid's files, so call it after the grid has run (planned together, --phase all ran the seeds at the grid's
    first point)."""
    if args.phase not in ("seeds", "all"):
        return []
    return [(arm, chosen_lr(args, arm), seed) for seed in _seeds(args) for arm in arms if ARMS[arm][0]]


def run_all(args, runs: list[tuple[str, float | None, int]]) -> None:
    """Each run in its own process, --jobs of them at a time (several share one GPU: a 135M model's runs are
    too small to fill it alone). Every run writes its own file, so the order of finishing does not matter."""
    if args.jobs <= 1:
        for run in runs:
            run_one(args, *run)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for finished in [pool.submit(run_one, args, *run) for run in runs]:
            finished.result()


def run_sweep(args, arms: list[str]) -> None:
    """The grid, then the seeds at the rates it chose."""
    for arm in arms:  # before any run starts
        check_one_order(args, arm, expected_order(args, arm))
    run_all(args, grid_plan(args, arms))
    run_all(args, seeds_plan(args, arms))


LOGGING_STEPS = 10  # --logging-steps of every run (see command)


def memory_probe(args, arms: list[str]) -> tuple[str, dict]:
    """Each trained arm's training peak RSS at every --probe-batch-sizes, from 3 steps of its command.

    The suite's batches are grouped by length with the longest first, so 3 steps reach the full run's longest
    batch. glibc's mmap threshold is fixed at 1 MiB (as in benchmarks/memory.py): freed buffers go back to the
    system, and the peak is what a step holds, not what the allocator's history kept. The slope between two
    batch sizes is the memory each extra sequence costs, which is where the arms differ.
    """
    sizes = [int(b) for b in args.probe_batch_sizes.split(",")]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    peaks: dict[str, dict[int, float]] = {}
    for arm in arms:
        if ARMS[arm][0] is None:
            continue
        for size in sizes:
            out = Path(tempfile.mkdtemp(prefix=f"memory.{arm}.b{size}.", dir=args.scratch))
            line = command(args, arm, run_grid(args, arm)[0][0], 0, out) + [
                "--max-steps", "3", "--per-device-train-batch-size", str(size), "--max-eval-samples", "2",
                "--per-device-eval-batch-size", "2"]
            with open(out / "train.log", "w") as log:
                subprocess.run(line, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
            peaks.setdefault(arm, {})[size] = json.loads((out / "results.json").read_text())["train_peak_rss_mb"]
            shutil.rmtree(out, ignore_errors=True)
            print(f"  memory {arm} batch {size}: {peaks[arm][size]:.0f} MB", flush=True)
    low, high = min(sizes), max(sizes)
    slope = {arm: (p[high] - p[low]) / (high - low) for arm, p in peaks.items()}
    rows = ["| arm | " + " | ".join(f"peak MB, batch {b}" for b in sizes) + " | MB per extra sequence |",
            "|" + " --- |" * (len(sizes) + 2)]
    rows += [f"| {arm} | " + " | ".join(f"{p[b]:.0f}" for b in sizes) + f" | {slope[arm]:.0f} |"
             for arm, p in peaks.items()]
    return "\n".join(rows), {"batch_sizes": sizes, "peak_rss_mb": peaks, "mb_per_sequence": slope,
                             "steps": 3, "malloc_mmap_threshold": 1048576}


def loss_curve(args, arm: str, lr: float | None, seed: int) -> list[tuple[int, float]]:
    """(step, training loss) every LOGGING_STEPS steps: from the run file's train_log, or, for runs made before
    results.json kept one, parsed from the run's printed Trainer log in OUT/train_logs."""
    run = _existing(args, arm, lr, seed)
    if run and run.get("train_log"):
        return [(entry["step"], entry["loss"]) for entry in run["train_log"]]
    log = Path(args.out) / "train_logs" / f"{run_name(arm, lr, seed)}.log"
    if not log.is_file():
        return []
    logged = [ast.literal_eval(line) for line in log.read_text().splitlines() if line.startswith("{'loss'")]
    return [(LOGGING_STEPS * (i + 1), float(entry["loss"])) for i, entry in enumerate(logged)]


def convergence(args, arms: list[str]) -> tuple[str, dict]:
    """Has the loss levelled off? Each run at its arm's chosen rate, from its logged loss (means of LOGGING_STEPS
    steps). Training loss falls in steps at each epoch boundary (examples seen again are memorised), so the
    curve over the whole run is no convergence signal. Two readings are: the loss in epoch 1, where every
    batch is new (its early and late halves: level means the fit to unseen examples stopped improving), and
    the mean loss of each epoch (how much of the fall is memorisation)."""
    lines = ["| arm | lr | seed | epoch 1 (unseen examples): first half → second half | mean loss per epoch |",
             "| --- | --- | --- | --- | --- |"]
    table = {}
    for arm in arms:
        lr = chosen_lr(args, arm)
        for seed in (0, 1, 2):
            curve = loss_curve(args, arm, lr, seed) if lr is not None else []
            run = _existing(args, arm, lr, seed)
            if len(curve) < 4 or run is None:
                continue
            per_epoch = -(-run["train_samples"] // run["batch_size"])  # steps; the last batch of an epoch is short
            epochs: dict[int, list[float]] = {}
            for step, loss in curve:  # a logging window that straddles an epoch boundary belongs to neither
                first, last = step - LOGGING_STEPS + 1, step
                if (first - 1) // per_epoch == (last - 1) // per_epoch:
                    epochs.setdefault((last - 1) // per_epoch + 1, []).append(loss)
            unseen = [loss for step, loss in curve if step > 2 * LOGGING_STEPS and step <= per_epoch]  # after warm-up
            halves = [statistics.mean(unseen[: len(unseen) // 2]), statistics.mean(unseen[len(unseen) // 2:])]
            means = {epoch: statistics.mean(losses) for epoch, losses in sorted(epochs.items())}
            table[run_name(arm, lr, seed)] = {"epoch1_halves": halves, "epoch_means": means, "steps_per_epoch": per_epoch}
            lines.append(f"| {arm} | {lr:g} | {seed} | {halves[0]:.3f} → {halves[1]:.3f} | "
                         + " · ".join(f"{epoch}: {mean:.3f}" for epoch, mean in means.items()) + " |")
    return "\n".join(lines), table


REFERENCES = ("lora", "full")  # every arm is compared with these two
# and pairs that answer one question each: do IST's scores beat drawing the same number of blocks uniformly?
# Does a selection variant beat FISH as shipped at the same count (issue 25's rule for `--method fish`'s default)?
# Does the training order change what an arm learns (its length groups shuffled against Trainer's order)?
# Does the CLI's LoRA dropout (0.1) hold LoRA back against PEFT's default (0)?
EXTRA_PAIRS = (("ist", "random"), ("ist-score-lr100", "random"),
               *((variant, "fish-lora8") for variant in ("random-linear-lora8", "taylor-linear-lora8",
                                                         "fish-linear-lora8", "fish-lora8-reselect")),
               ("fish-lora8-shuffled", "fish-lora8"), ("lora-shuffled", "lora"), ("full-shuffled", "full"),
               ("random-linear-lora8-shuffled", "random-linear-lora8"),
               # and, all shuffled, each arm against shuffled LoRA and shuffled full FT, random entries against FISH
               ("fish-lora8-shuffled", "lora-shuffled"), ("random-linear-lora8-shuffled", "lora-shuffled"),
               ("random-linear-lora8-shuffled", "fish-lora8-shuffled"),
               *((arm, "full-shuffled") for arm in ("lora-shuffled", "fish-lora8-shuffled",
                                                    "random-linear-lora8-shuffled")),
               # LoRA without its dropout against LoRA with it, and FISH as shipped against it
               ("lora-nodropout-shuffled", "lora-shuffled"), ("fish-lora8-shuffled", "lora-nodropout-shuffled"))


def _pairs(arms: list[str]) -> list[tuple[str, str]]:
    """(arm, reference) for every trained arm against LoRA and full FT (each pair once), then EXTRA_PAIRS."""
    pairs = [(arm, reference) for reference in REFERENCES for arm in arms
             if arm != reference and ARMS[arm][0] is not None and arm not in REFERENCES[:REFERENCES.index(reference)]]
    extra = [(arm, reference) for arm, reference in EXTRA_PAIRS if arm in arms and reference in arms]
    return list(dict.fromkeys(pairs + extra))  # a pair both lists hold is tested (and reported) once


def _runs_at_chosen_rate(args, arm: str) -> list[dict]:
    """The runs behind an arm's row: its seeds at the chosen rate, or zero-shot's one run (nothing trains, so
    there are no seeds: its file would otherwise count once per seed)."""
    lr = chosen_lr(args, arm)
    seeds = (0, 1, 2) if lr is not None else (0,)
    return [r for seed in seeds if (r := _existing(args, arm, lr, seed)) is not None]


def _seed_values(args, arm: str, split: str, metric: str) -> list[float]:
    return [100 * (_score(args, r, split) if metric == SELECT_ON else r["metrics"][split][metric])
            for r in _runs_at_chosen_rate(args, arm)]


def comparisons(args, arms: list[str]) -> tuple[str, dict]:
    """Each arm against LoRA and full FT (and EXTRA_PAIRS), per split and metric: the difference of the seed
    means and Welch's t (unequal variances) over the seeds. Every run is scored on the same questions, so this is over training
    seeds only: it says whether a gap is larger than the seed-to-seed spread, not over the question sample."""
    from scipy.stats import ttest_ind

    measures = (("validation", "acc"), ("test", "acc"), ("test", "acc_norm"))
    if is_suite(args):  # its headline first
        measures = (("validation", SELECT_ON), ("test", SELECT_ON), ("test", "acc"))
    names = {SELECT_ON: "macro-bal"}
    lines = ["| arm | against | " + " | ".join(f"{split} {names.get(metric, metric)}: diff (t, p)"
                                                for split, metric in measures) + " |", "| --- | --- | --- | --- | --- |"]
    table = {}
    for arm, reference in _pairs(arms):
        cells, entry = [], {}
        for split, metric in measures:
            ours, theirs = _seed_values(args, arm, split, metric), _seed_values(args, reference, split, metric)
            if len(ours) < 2 or len(theirs) < 2:
                break
            test = ttest_ind(ours, theirs, equal_var=False)
            diff = statistics.mean(ours) - statistics.mean(theirs)
            entry[f"{split}_{metric}"] = {"diff": diff, "t": float(test.statistic), "p": float(test.pvalue),
                                          "seeds": [len(ours), len(theirs)]}
            cells.append(f"{diff:+.2f} ({test.statistic:+.1f}, {test.pvalue:.2f})")
        if len(cells) == 3:
            table[f"{arm}_vs_{reference}"] = entry
            lines.append(f"| {arm} | {reference} | " + " | ".join(cells) + " |")
    return "\n".join(lines), table


@functools.lru_cache(maxsize=None)
def _split_questions(data_dir: str, seed: int, task: str = "social_iqa") -> dict:
    """The validation and test questions of a run's split (one task or a suite), in the order its option scores
    were kept."""
    from sparsepeft.experiments.pipeline import load_task_data

    return load_task_data(task, data_dir, split_seed=seed).evaluation


def _scored_questions(args, run: dict, split: str) -> tuple[list, list[list[float]]] | None:
    """The questions of a run's split and the option scores it kept for them (None for runs that kept none),
    checked against each other: the scores must give the run's recorded accuracy."""
    scores = (run.get("option_log_likelihoods") or {}).get(split)
    if scores is None:
        return None
    from sparsepeft.data.multiple_choice import answer_hits

    questions = _split_questions(args.data_dir, run["data_split"]["seed"], _task(args))[split]
    hits = answer_hits(questions, scores)
    if len(questions) != len(scores) or sum(hits) / len(hits) != run["metrics"][split]["acc"]:
        raise SystemExit(f"the kept option scores of a {run['method']} run do not match {args.data_dir}'s split: "
                         "score it against the task file it was trained on")
    return questions, scores


def _correct(args, run: dict, split: str) -> tuple[list[bool], list[str], list[float]] | None:
    """Per question: did the run's highest summed log-likelihood fall on the right option (`acc`)? The task each
    question comes from ("" outside a suite), and its weight in the macro-averaged balanced accuracy."""
    from sparsepeft.data.multiple_choice import answer_hits, balanced_weights

    scored = _scored_questions(args, run, split)
    if scored is None:
        return None
    questions, scores = scored
    return answer_hits(questions, scores), [q.task for q in questions], balanced_weights(questions)


def _pooled_over_seeds(pairs: list[tuple[str, tuple, tuple]]) -> tuple[str, tuple, tuple]:
    """Several seeds' paired runs as one sample, labelled by its seeds ("0+1+2"): each seed's questions once
    more, every weight divided by the number of seeds. The weighted difference is then the mean over the seeds of
    each seed's headline difference, and the permutation test flips each (seed, question) pair on its own: the
    seeds' evidence added up, as a pooled McNemar test does for accuracy."""
    share = 1 / len(pairs)
    hits, tasks, weights, other_hits = [], [], [], []
    for _, (run_hits, run_tasks, run_weights), (reference_hits, _, _) in pairs:
        hits += run_hits
        tasks += run_tasks
        weights += [w * share for w in run_weights]
        other_hits += reference_hits
    return "+".join(seed for seed, _, _ in pairs), (hits, tasks, weights), (other_hits, tasks, weights)


def paired_comparisons(args, arms: list[str]) -> tuple[str, dict]:
    """Each pair of comparisons() on the same questions, seed by seed, for runs that kept their option
    scores: exact McNemar test on the questions one run gets right and the other wrong. Welch's t above sees
    only the seed-to-seed spread of accuracies; this sees which questions changed, so it separates smaller gaps
    (it is conditional on the question sample, as every accuracy here is). Every trained arm is also paired with
    zero-shot (the floor: did training help on these questions?). A suite adds one test per task beside the
    pooled one (keys ending in the task's name). Where two or more seeds pair up, a last row pools them (seed
    column "0+1+2", key "..._seed0+1+2_..."): one seed's gap can be its training noise, the pooled one is the
    arm's."""
    lines = ["| arm | against | seed | split | acc diff | only arm right / only reference right | McNemar p |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    macro_lines = ["| arm | against | seed | split | macro-balanced diff | questions they disagree on | "
                   "paired permutation p |", "| --- | --- | --- | --- | --- | --- | --- |"]
    table = {}
    floor = [(arm, "zero-shot") for arm in arms if ARMS[arm][0] is not None] if "zero-shot" in arms else []
    for arm, reference in _pairs(arms) + floor:
        if reference == "zero-shot":  # untrained, one run: the floor every seed is paired with
            zero = _existing(args, reference, None, 0)
            theirs = {seed: zero for seed in (0, 1, 2)} if zero is not None else {}
        else:
            theirs = {r["seed"]: r for r in _runs_at_chosen_rate(args, reference)}
        paired = {split: [] for split in ("validation", "test")}  # (seed, ours, against) at each shared seed
        for run in _runs_at_chosen_rate(args, arm):
            other = theirs.get(run["seed"])
            for split in ("validation", "test"):
                ours = _correct(args, run, split)
                against = _correct(args, other, split) if other is not None else None
                if ours is None or against is None:
                    continue
                paired[split].append((str(run["seed"]), ours, against))
        for split, pairs in paired.items():
            if len(pairs) > 1:  # after the seeds one by one, all of them as one sample
                pairs.append(_pooled_over_seeds(pairs))
            for seed, ours, against in pairs:
                (hits, tasks, weights), (other_hits, _, _) = ours, against
                key = f"{arm}_vs_{reference}_seed{seed}_{split}"
                if len(set(tasks)) > 1:  # a suite: the headline first, then McNemar pooled and per task
                    entry = paired_weighted_test(hits, other_hits, weights)
                    table[f"{key}_macro"] = entry
                    macro_lines.append(f"| {arm} | {reference} | {seed} | {split} | {entry['diff']:+.2f} | "
                                       f"{entry['disagree']} | {entry['p']:.3f} |")
                groups = {"": range(len(hits))}  # pooled, then each task of a suite
                if len(set(tasks)) > 1:
                    groups |= {task: [i for i, t in enumerate(tasks) if t == task] for task in dict.fromkeys(tasks)}
                for task, chosen in groups.items():
                    entry = mcnemar([hits[i] for i in chosen], [other_hits[i] for i in chosen])
                    table[key + (f"_{task}" if task else "")] = entry
                    lines.append(f"| {arm} | {reference} | {seed} | {split}{f' ({task})' if task else ''} | "
                                 f"{entry['diff']:+.2f} | {entry['only_arm_right']} / {entry['only_reference_right']} | "
                                 f"{entry['mcnemar_p']:.3f} |")
    if not table:
        lines.append("| (no pair of runs at a shared seed kept its option scores: runs before 027d6d5 did not) "
                     "| | | | | | |")
    if len(macro_lines) > 2:
        lines = macro_lines + ["", "Accuracy, pooled and per task (exact McNemar test on the questions only one of "
                                   "the two runs gets right):", ""] + lines
    return "\n".join(lines), table


def plot_loss_curves(args, arms: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for arm in arms:
        lr = chosen_lr(args, arm)
        curves = [c for seed in (0, 1, 2) if lr is not None and (c := loss_curve(args, arm, lr, seed))]
        if not curves:
            continue
        length = min(len(c) for c in curves)  # the seeds' mean, step by step
        steps = [step for step, _ in curves[0][:length]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(length)]
        axis.plot(steps, mean, label=f"{arm} (lr {lr:g}, {len(curves)} seed{'s' * (len(curves) > 1)})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(f"training loss (mean of {LOGGING_STEPS} steps)")
    axis.set_title(f"SmolLM2-135M on {getattr(args, 'task', 'social_iqa')}: training loss at each arm's chosen rate",
                   fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def measured_on(run: dict) -> str:
    """The machine a run file was measured on, in words: its GPU, or its CPU."""
    machine = run["provenance"]["machine"]
    return machine.get("cuda") or f"{machine['cpu_count']}-core {machine['processor']} CPU"


def summary(args, arms: list[str]) -> tuple[str, dict]:
    """One row per arm at its chosen rate. The suite's runs may come from more than one machine (the CPU here,
    a lent GPU): accuracy does not depend on it, step time and peak memory do, so an arm whose runs were
    measured on different machines shows no step time or peak (each run file keeps its own)."""
    suite = is_suite(args)
    lines = ["| arm | lr (chosen on validation) | seeds | " + ("validation macro-bal | test macro-bal | " * suite)
             + "validation acc | test acc | test acc_norm | trainable params | "
             "step s | train peak RSS MB | optimizer state MB | mask/probe s | measured on |",
             "|" + " --- |" * (12 + 2 * suite)]
    table = {}
    for arm in arms:
        lr = chosen_lr(args, arm)
        runs = _runs_at_chosen_rate(args, arm)
        if not runs:
            continue

        def stat(values):
            mean = statistics.mean(values)
            return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)

        macro = {split: stat([100 * _score(args, r, split) for r in runs]) for split in ("validation", "test")}
        val = stat([100 * r["metrics"]["validation"]["acc"] for r in runs])
        test = stat([100 * r["metrics"]["test"]["acc"] for r in runs])
        norm = stat([100 * r["metrics"]["test"]["acc_norm"] for r in runs])
        steps = [r["train_seconds"] / r["train_steps"] for r in runs if r.get("train_steps")]
        peak = [r["train_peak_rss_mb"] for r in runs]
        optimizer = [r.get("optimizer_state_bytes", 0) / 2**20 for r in runs]
        mask = [r.get("mask_seconds") or (r.get("layerwise") or {}).get("probe_seconds") or 0.0 for r in runs]
        table[arm] = {"lr": lr, "seeds": len(runs), "validation_macro_balanced_acc": macro["validation"],
                      "test_macro_balanced_acc": macro["test"], "validation_acc": val, "test_acc": test, "test_acc_norm": norm,
                      "trainable_params": runs[0]["trainable_params"], "step_seconds": steps, "train_peak_rss_mb": peak,
                      "optimizer_state_mb": optimizer, "mask_seconds": mask,
                      "commits": sorted({r["provenance"]["commit"] for r in runs}),
                      "machines": (machines := sorted({measured_on(r) for r in runs}))}
        cell = lambda m: f"{m[0]:.2f} ± {m[1]:.2f}"  # noqa: E731
        trainable = f"{runs[0]['trainable_params']:,}" if runs[0].get("train_steps") else "0 (no training)"
        one_machine = len(machines) == 1
        step = f"{statistics.median(steps) if steps else 0:.2f}" if one_machine else "—"
        peak_cell = f"{statistics.median(peak):.0f}" if one_machine else "—"
        macro_cells = f"{cell(macro['validation'])} | {cell(macro['test'])} | " if suite else ""
        lines.append(f"| {arm} | {lr if lr is not None else '—'} | {len(runs)} | {macro_cells}"
                     f"{cell(val)} | {cell(test)} | {cell(norm)} | {trainable} | {step} | {peak_cell} | {statistics.median(optimizer):.1f} | "
                     f"{statistics.median(mask):.0f} | {'; '.join(machines)} |")
    return "\n".join(lines), table


def _test_per_task(args, run: dict) -> dict | None:
    """A suite run's test metrics per task, with each task's balanced accuracy (recomputed from the kept option
    scores for runs older than it)."""
    per_task = run["metrics"]["test"].get("per_task")
    if not per_task or not all("balanced_acc" in m for m in per_task.values()):
        per_task = (_recomputed(args, run, "test") or {}).get("per_task", per_task)
    return per_task


def per_task_table(args, arms: list[str]) -> tuple[str, dict]:
    """A suite's test scores per task (mean ± std over the seeds at each arm's chosen rate): accuracy beside the
    pooled one, then balanced accuracy beside their mean (the headline, SELECT_ON)."""
    tasks: list[str] = []
    table: dict = {"acc": {}, "balanced_acc": {}}
    for arm in arms:
        runs = _runs_at_chosen_rate(args, arm)
        per_run = [_test_per_task(args, r) for r in runs]
        if not runs or not all(per_run):
            continue
        for task in dict.fromkeys(task for p in per_run for task in p):  # a --smoke subset can miss a task
            for metric, cells in table.items():
                values = [100 * p[task][metric] for p in per_run if task in p]
                cells.setdefault(arm, {})[task] = (statistics.mean(values),
                                                   statistics.stdev(values) if len(values) > 1 else 0.0)
            tasks += [task] if task not in tasks else []
        for metric, overall in (("acc", [100 * r["metrics"]["test"]["acc"] for r in runs]),
                                ("balanced_acc", [100 * _score(args, r, "test") for r in runs])):
            table[metric][arm]["all"] = (statistics.mean(overall), statistics.stdev(overall) if len(overall) > 1 else 0.0)
    if not table["acc"]:
        return "", {}
    sections = []
    for metric, last in (("acc", "pooled"), ("balanced_acc", "mean over tasks (headline)")):
        lines = [f"| arm | " + " | ".join(tasks) + f" | {last} |", "|" + " --- |" * (len(tasks) + 2)]
        for arm, cells in table[metric].items():
            lines.append(f"| {arm} | " + " | ".join(f"{cells[t][0]:.2f} ± {cells[t][1]:.2f}" if t in cells else "—"
                                                  for t in [*tasks, "all"]) + " |")
        sections.append("\n".join(lines))
    markdown = sections[0] + "\n\nBalanced accuracy per task (each right answer weighs the same on a task whose " \
        "questions all offer the same answers, so one answer to every question scores chance; plain accuracy on " \
        "a task whose questions have their own options) and their mean, the suite's headline and rate rule:\n\n" \
        + sections[1]
    return markdown, table


def _most_frequent_share(answers: list[str]) -> tuple[str, float]:
    text, count = Counter(answers).most_common(1)[0]
    return text, count / len(answers)


def answer_concentration(args, arms: list[str]) -> tuple[str, dict]:
    """Per task of a suite: the share of the test questions that each run answers with its most frequent answer
    (1.00: the same answer to every question), beside the accuracy of always giving the most frequent right
    answer. On a task whose options are the same words for every question (winowhy's correct / incorrect), a run
    that answers one of them throughout has learned a prior, not the task, and its accuracy is that answer's
    share: the per-task table cannot tell this from learning, so it is shown here."""
    from sparsepeft.data.multiple_choice import chosen_options

    questions = _split_questions(args.data_dir, 0, _task(args))["test"]
    tasks = list(dict.fromkeys(q.task for q in questions))
    if len(tasks) < 2:
        return "", {}
    by_task = {task: [i for i, q in enumerate(questions) if q.task == task] for task in tasks}
    table = {"always the most frequent right answer": {
        task: _most_frequent_share([questions[i].options[questions[i].answer].strip() for i in idx])
        for task, idx in by_task.items()}}
    for arm in arms:
        runs = _runs_at_chosen_rate(args, arm)
        for run in runs:
            scores = (run.get("option_log_likelihoods") or {}).get("test")
            if scores is None or run["data_split"]["seed"] != 0 or len(scores) != len(questions):
                continue
            chosen = [q.options[option].strip() for q, option in zip(questions, chosen_options(scores))]
            name = run_name(arm, run.get("learning_rate") if arm != "zero-shot" else None, run["seed"])
            table[name] = {task: _most_frequent_share([chosen[i] for i in idx]) for task, idx in by_task.items()}
    lines = ["| run | " + " | ".join(tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]
    lines += [f"| {name} | " + " | ".join(f"{share:.2f} ('{text}')" for text, share in cells.values()) + " |"
              for name, cells in table.items()]
    return "\n".join(lines), table


def grid_table(args, arms: list[str]) -> tuple[str, dict]:
    """Validation accuracy (seed 0) at every grid point run so far, and at the points outside the grid: the
    learning-rate search behind the table."""
    lines, table = [], {}
    groups = {}  # one table per family and grid: an arm whose grid moved gets its own columns
    for arm in arms:
        if ARMS[arm][0] is not None:
            groups.setdefault((ARMS[arm][0], *run_grid(args, arm)), []).append(arm)
    for (family, grid, off_grid), members in sorted(groups.items(), key=lambda g: list(GRIDS).index(g[0][0])):
        moved = ", grid moved up" if grid != GRIDS[family] else ""
        lines += ["", f"| {family} family{moved}, seed 0 | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen | "
                  + " | ".join(f"outside the grid: lr {lr:g}" for lr in off_grid) + " |",
                  "|" + " --- |" * (len(grid) + 2 + len(off_grid))]
        for arm in members:
            runs = {lr: _existing(args, arm, lr, 0) for lr in (*grid, *off_grid)}
            table[arm] = {f"{lr:g}": run["metrics"]["validation"] if run else None for lr, run in runs.items()}
            cells = [f"{100 * _score(args, run, 'validation'):.2f}" if run else "not run" for run in runs.values()]
            ran = any(runs[lr] for lr in grid)  # chosen_lr's fallback (no point run) is no choice: say so
            cells.insert(len(grid), f"{chosen_lr(args, arm):g}" if ran else "—")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines[1:]), table


def _suite_training_lengths(args) -> tuple[list[int], list[str]]:
    """Each training question's token length as the runs train it, and what it is: its task, or on a two-answer task
    its task and right answer (the answer a constant guess would give)."""
    from transformers import AutoTokenizer

    from sparsepeft.data.multiple_choice import load_suite, training_features
    from sparsepeft.data.tasks import task_names
    from sparsepeft.models.catalog import resolve_model

    tasks = task_names(_task(args))
    suite = load_suite({task: Path(args.data_dir) / task / "task.json" for task in tasks})
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    lengths = [len(f["input_ids"]) for f in training_features(suite.train, tokenizer, args.max_seq_length)]
    options_by_task: dict[str, set] = {}
    for e in suite.train:
        options_by_task.setdefault(e.task, set()).add(e.options)
    two_answer = {task for task, options in options_by_task.items() if len(options) == 1 and len(next(iter(options))) == 2}
    kinds = [f"{e.task}: {e.options[e.answer]}" if e.task in two_answer else e.task for e in suite.train]
    return lengths, kinds


def _order_statistics(order: list[int], kinds: list[str], batch: int, steps: int, mega: int) -> dict:
    """What the first ``steps`` batches of an order train: how many hold one task only, each tenth of a mega-batch's
    task shares, the last ten steps' task shares, and per two-answer task the right answers' shares in the first
    and second half of its questions inside each mega-batch."""
    batches = [order[i * batch:(i + 1) * batch] for i in range(steps)]
    task = [k.split(":")[0] for k in kinds]
    names = sorted(set(task))
    one_task = sum(len({task[i] for i in b}) == 1 for b in batches) / len(batches)
    tenths = []
    for tenth in range(10):
        picked = [i for step, b in enumerate(batches) if (step % mega) * 10 // mega == tenth for i in b]
        tenths.append({name: round(sum(task[i] == name for i in picked) / len(picked), 3) for name in names}
                      if picked else None)  # a mega-batch of fewer than 10 steps leaves some tenths empty
    last = [i for b in batches[-10:] for i in b]
    halves = {}
    for name in {k.split(":")[0] for k in kinds if ":" in k}:
        first, second = [], []
        for start in range(0, len(batches), mega):
            seen = [i for b in batches[start:start + mega] for i in b if task[i] == name]
            first += seen[:len(seen) // 2]
            second += seen[len(seen) // 2:]
        answers = sorted({kinds[i] for i in first + second})
        halves[name] = {half: {a.split(": ")[1]: round(sum(kinds[i] == a for i in part) / max(len(part), 1), 3)
                               for a in answers} for half, part in (("first half", first), ("second half", second))}
    return {"steps_of_one_task": round(one_task, 3), "task_share_by_tenth_of_mega_batch": tenths,
            "task_share_last_10_steps": {name: round(sum(task[i] == name for i in last) / len(last), 3) for name in names},
            "answer_share_by_half_within_mega_batch": halves}


def train_order_report(args, seeds: tuple[int, ...] = (0, 1, 2)) -> tuple[str, dict]:
    """Which tasks the suite's steps train under Trainer's length grouping and with --shuffle-length-groups, for
    permutations drawn from torch's generator at ``seeds`` (a run's own permutation differs; the structure does not).
    Reads the data and the tokenizer only: no model runs."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from sparsepeft.data.sampling import shuffled_length_groups

    lengths, kinds = _suite_training_lengths(args)
    mega = min(len(lengths) // (args.batch_size * 4), 50)  # Trainer's mega-batch, in batches
    orders = {"group_by_length": get_length_grouped_indices, "shuffled": shuffled_length_groups}
    report = {"batch_size": args.batch_size, "steps": args.steps, "mega_batch_batches": mega, "seeds": list(seeds),
              "training_questions": len(lengths), "orders": {}}
    for name, make in orders.items():
        per_seed = []
        for seed in seeds:
            torch.manual_seed(seed)
            per_seed.append(_order_statistics(make(lengths, args.batch_size), kinds, args.batch_size, args.steps, mega))
        report["orders"][name] = per_seed
    def top(shares: dict | None) -> str:  # the most frequent task and its share
        if not shares:
            return "-"
        task, share = max(shares.items(), key=lambda kv: kv[1])
        return f"{task} {share:.2f}"

    lines = ["| order | seed | steps of one task | last 10 steps | " +
             " | ".join(f"tenth {t + 1}" for t in range(10)) + " |", "| --- " * 14 + "|"]
    for name, per_seed in report["orders"].items():
        for seed, stats in zip(seeds, per_seed):
            lines.append(f"| {name} | {seed} | {stats['steps_of_one_task']:.2f} | {top(stats['task_share_last_10_steps'])} | "
                         + " | ".join(top(t) for t in stats["task_share_by_tenth_of_mega_batch"]) + " |")
    return "\n".join(lines), report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data/bigbench")
    parser.add_argument("--task", default="social_iqa", help="a BIG-bench task under --data-dir, or several "
                        f"comma-separated: the commonsense suite ({COMMONSENSE_SUITE}), "
                        "trained on the union, reported per task and pooled")
    parser.add_argument("--max-seq-length", type=int, default=128,
                        help="prompts are cut from the left, options kept whole (timedial's prompts need ~256)")
    parser.add_argument("--arms", default="zero-shot,lora,ist,fish,lora-fish,full,random,lisa",
                        help="in the order they run; shira-random, shira-fisher and ist-score-lr100 are extra arms")
    parser.add_argument("--phase", default="grid", choices=["grid", "seeds", "all"])
    parser.add_argument("--lrs", default="",
                        help="with --phase grid: these learning rates (comma-separated, in this order) instead of the "
                             "family's grid, e.g. one point first or a point outside the grid")
    parser.add_argument("--seeds", default="1,2",
                        help="with --phase seeds: the training seeds run at each arm's chosen rate (seed 0 is the grid's)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each its own process (on a GPU: several small runs share it)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--fisher-samples", type=int, default=512)
    parser.add_argument("--out", default="docs/results/llm")
    parser.add_argument("--scratch", default=tempfile.gettempdir(), help="where run folders live until their file is written")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="2 steps on a few examples per arm: checks every arm runs")
    parser.add_argument("--probe-batch-sizes", default="",
                        help="instead of the sweep: each arm's training peak RSS at these batch sizes (e.g. 4,8), "
                             "3 steps each, written to OUT/memory_probe.json")
    parser.add_argument("--train-order", default="trainer", choices=["trainer", "shuffled"],
                        help="a suite's length-grouped batches in Trainer's order (longest to shortest within each "
                             "mega-batch: the tasks one after another; every run in docs/results/llm_suite) or shuffled "
                             "(--shuffle-length-groups; the suite's runs should use it from now on, in a new --out). "
                             "An arm's runs in one --out must share one order")
    parser.add_argument("--order-report", action="store_true",
                        help="instead of the sweep: which task each step trains under Trainer's length grouping and with "
                             "--shuffle-length-groups (data and tokenizer only), written to OUT/train_order.json")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: runs at a time must be at least 1")
    try:
        seeds = _seeds(args)
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated whole numbers, e.g. 1,2")
    if 0 in seeds:
        parser.error("--seeds: seed 0 is the grid's seed (--phase grid); give the extra seeds, e.g. 1,2")
    if args.train_order == "shuffled" and not is_suite(args):
        parser.error("--train-order shuffled: one task's runs are not grouped by length; it applies to a suite "
                     "(--task a,b,...)")
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {list(ARMS)}")
    if args.order_report:
        markdown, report = train_order_report(args)
        print(markdown)
        write_json(Path(args.out) / "train_order.json", {"provenance": provenance(sys.argv), **report})
        return
    if args.probe_batch_sizes:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
        markdown, probe = memory_probe(args, arms)
        print(markdown)
        write_json(Path(args.out) / "memory_probe.json", {"provenance": provenance(sys.argv), **probe})
        return
    if not args.summary_only:
        run_sweep(args, arms)
    # the summary covers every arm with results, not only this invocation's: running the sweep in pieces
    # must not shrink it
    reported = [arm for arm in ARMS if arm in arms or _has_results(args, arm)]
    for arm in reported:
        check_one_order(args, arm)
    markdown, table = summary(args, reported)
    task_markdown, per_task = per_task_table(args, reported)
    if task_markdown:
        markdown += "\n\nTest accuracy per task of the suite (acc, mean ± std over seeds):\n\n" + task_markdown
    concentration_markdown, concentration = answer_concentration(args, reported) if not args.smoke else ("", {})
    if concentration_markdown:
        markdown += "\n\nShare of each task's test questions given the run's most frequent answer (1.00: one answer " \
            "to every question; the first row is the accuracy of always giving the most frequent right answer):\n\n" \
            + concentration_markdown
    grid_markdown, grid = grid_table(args, reported)
    markdown += "\n\nValidation accuracy at each learning rate (seed 0; the chosen rate is the best one run):\n\n" + grid_markdown
    comparison_markdown, compared = comparisons(args, reported)
    markdown += "\n\nEach arm with at least two seeds against LoRA and full FT, and IST against uniform draws " \
        "(percentage points; Welch's t and two-sided p over training seeds):\n\n" + comparison_markdown
    # a --smoke run scores a few questions, not its split's: nothing to pair question by question
    paired_markdown, paired = paired_comparisons(args, reported) if not args.smoke else ("", {})
    markdown += "\n\nThe same comparisons question by question, for runs that kept each option's log-likelihood " + (
        "(the suite's headline, macro-averaged balanced accuracy: a paired permutation test that swaps the two runs' "
        "answers question by question):" if is_suite(args) else
        "(exact McNemar test on the questions only one of the two runs gets right):") + "\n\n" + paired_markdown
    convergence_markdown, converged = convergence(args, reported)
    markdown += "\n\nTraining loss at each arm's chosen rate (runs whose log was kept; see convergence()):\n\n" \
        + convergence_markdown
    print(markdown)
    if not args.smoke:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.md").write_text(markdown + "\n")
        write_json(Path(args.out) / "summary.json", {
            "provenance": provenance(), "table": table, "validation_grid": grid, "comparisons": compared,
            "paired": paired, "per_task": per_task, "task": args.task, "answer_concentration": concentration,
            "training_loss": converged})
        if converged:
            plot_loss_curves(args, reported, Path(args.out) / "loss_curves.png")


if __name__ == "__main__":
    main()
