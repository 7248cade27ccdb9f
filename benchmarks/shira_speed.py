"""Step time and training peak of PEFT's SHiRA against LoRA and against sparsepeft's sparse engine training
exactly the same entries.

    python benchmarks/shira_speed.py --out docs/results/shira_speed_cpu.json

The packaged MiniLM (sequence classification, 2 labels), query/value targets, batch 16 x 128 tokens:

- lora: LoRA r=8 (the same trainable count as SHiRA r=8: r(m+n) per 384 x 384 weight);
- shira: PEFT's SHiRA r=8 — its forward builds W + sparse delta, a copy of every adapted weight per call;
- sparse-engine: the base model with sparsepeft's SparseDeltaEngine on SHiRA's own entries (and the head):
  the same trained entries and optimizer state, the model's own forward.

Step time: the three train in one process on the same batches in rotating order (forward, backward,
clipping, AdamW), so machine noise hits all alike; ratios are medians over rounds. Peak RSS: each arm in
a fresh process (build, two warm-up steps, then the high-water mark of --peak-steps steps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, provenance, random_token_data, timed, write_json  # noqa: E402

from sparsepeft import SparseDeltaEngine, select_mask  # noqa: E402
from sparsepeft.data.collate import PaddingCollator  # noqa: E402
from sparsepeft.experiments.pipeline import PeakMemory  # noqa: E402
from sparsepeft.models.catalog import resolve_model  # noqa: E402
from sparsepeft.models.peft import apply_method  # noqa: E402

ARMS = ("lora", "shira", "sparse-engine")
TARGETS = ["query", "value"]


def _base():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2)


def _shira_entries(rank: int) -> dict[str, torch.Tensor]:
    """SHiRA's (random, seeded) entries per adapted weight, as flat indices of the base weight."""
    shira = apply_method(_base(), "shira", {"r": rank, "target_modules": TARGETS, "random_seed": 0})
    entries = {}
    for name, module in shira.named_modules():
        if getattr(module, "shira_indices", None):
            rows, cols = module.shira_indices["default"].long()
            base_name = name.replace("base_model.model.", "", 1) + ".weight"
            entries[base_name] = rows * module.in_features + cols
    return entries


def build(arm: str, rank: int):
    """(model, optimizer, trainable count) for one arm."""
    if arm in ("lora", "shira"):
        options = {"r": rank, "target_modules": TARGETS, **({"random_seed": 0} if arm == "shira" else {})}
        model = apply_method(_base(), arm, options)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        return model.train(), optimizer, sum(p.numel() for p in params)
    model = _base()
    entries = _shira_entries(rank)
    scores = {}
    for name, param in model.named_parameters():
        if name in entries:
            score = torch.zeros(param.numel())
            score[entries[name]] = 1.0
            scores[name] = score.reshape(param.shape)
        elif name.startswith("classifier."):
            scores[name] = torch.zeros(param.shape)
    budget = sum(i.numel() for i in entries.values()) + sum(s.numel() for n, s in scores.items() if n.startswith("classifier."))
    mask = select_mask(scores, model=model, budget=budget, always_train=("classifier",))
    engine = SparseDeltaEngine(model, mask).attach()
    optimizer = torch.optim.AdamW(list(engine.trainable_parameters()), lr=1e-4, weight_decay=0.01)
    engine.attach_optimizer(optimizer)
    return model.train(), optimizer, mask.num_selected


def step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _batches(args, vocab: int):
    collate = PaddingCollator(0)
    data = random_token_data(args.batch_size * 4, args.seq_len, vocab)
    return [collate(data[i : i + args.batch_size]) for i in range(0, len(data), args.batch_size)]


def peak_of(arm: str, args) -> dict:
    """In this (fresh) process: the training phase's peak RSS of one arm."""
    model, optimizer, trainable = build(arm, args.rank)
    batches = _batches(args, model.config.vocab_size)
    for batch in batches[:2]:
        step(model, optimizer, batch)
    phase = PeakMemory()
    for i in range(args.peak_steps):
        step(model, optimizer, batches[i % len(batches)])
    return {"arm": arm, "trainable": trainable, "train_peak_rss_mb": phase.read_mb()["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--peak-steps", type=int, default=5)
    parser.add_argument("--peak-arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: one arm's peak, in a child
    parser.add_argument("--out", default="docs/results/shira_speed_cpu.json")
    args = parser.parse_args()
    if args.peak_arm:
        print(json.dumps(peak_of(args.peak_arm, args)))
        return

    built = {arm: build(arm, args.rank) for arm in ARMS}
    batches = _batches(args, built["lora"][0].config.vocab_size)
    for model, optimizer, _ in built.values():  # warm-up: allocator, optimizer state
        step(model, optimizer, batches[0])
    times = {arm: [] for arm in ARMS}
    for i in range(args.rounds):
        batch = batches[i % len(batches)]
        order = ARMS[i % 3:] + ARMS[: i % 3]
        for arm in order:
            model, optimizer, _ = built[arm]
            times[arm].append(timed(lambda: step(model, optimizer, batch)))
    del built
    peaks = {}
    for arm in ARMS:
        child = subprocess.run([sys.executable, __file__, "--peak-arm", arm, "--rank", str(args.rank), "--seq-len",
                                str(args.seq_len), "--batch-size", str(args.batch_size), "--peak-steps",
                                str(args.peak_steps)], capture_output=True, text=True, check=True)
        peaks[arm] = json.loads(child.stdout.strip().splitlines()[-1])
    ratio = lambda a, b: median([x / y for x, y in zip(times[a], times[b])])  # noqa: E731
    result = {
        "provenance": provenance(), "args": vars(args),
        "trainable": {arm: peaks[arm]["trainable"] for arm in ARMS},
        "median_step_s": {arm: median(v) for arm, v in times.items()},
        "step_ratio_median_of_rounds": {"shira/lora": ratio("shira", "lora"),
                                        "sparse-engine/lora": ratio("sparse-engine", "lora"),
                                        "sparse-engine/shira": ratio("sparse-engine", "shira")},
        "train_peak_rss_mb": {arm: peaks[arm]["train_peak_rss_mb"] for arm in ARMS},
    }
    print(json.dumps(result, indent=2), flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
