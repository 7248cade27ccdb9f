"""Speed of FISH Mask on the packaged MiniLM: Fisher pass and masked training step.

    python benchmarks/speed.py --out docs/results/speed_cpu.json

1. Fisher over N samples (seq len 128, batch 32): the batched per-sample engine against
   (a) a batch-size-1 loop giving the same result (checked on the loop's samples), and
   (b) one plain training pass (forward, backward, AdamW step) over the same batches.
   Each batch is timed side by side — Fisher on it, a training step on it, and (on the first
   --loop-samples samples) the loop over its samples — so every ratio is a median of interleaved pairs.
2. Training step with a FISH 0.5% mask (dense-mask engine) against full fine-tuning: steps alternate
   between two copies of the model on the same batches; medians over the repeats.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, provenance, random_token_data, timed, write_json  # noqa: E402

from sparsepeft import DenseMaskEngine, estimate_fisher, select_mask  # noqa: E402
from sparsepeft.data import PaddingCollator  # noqa: E402
from sparsepeft.experiments.pipeline import resolve_model  # noqa: E402


def load_model(device):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2).to(device)


def loop_fisher(model, examples, device):
    """The obvious way: one sample at a time, square the whole gradient, add it up."""
    model.eval()
    params = [p for p in model.parameters()]
    totals = [torch.zeros_like(p) for p in params]
    times = []
    for ex in examples:
        def one():
            ids = torch.tensor([ex["input_ids"]], device=device)
            loss = F.cross_entropy(model(input_ids=ids).logits, torch.tensor([ex["labels"]], device=device))
            for total, grad in zip(totals, torch.autograd.grad(loss, params)):
                total.add_(grad.square())
        times.append(timed(one, device))
    return {n: t / len(examples) for (n, _), t in zip(model.named_parameters(), totals)}, times


def fisher_vs_training(model, data, batch_size, loop_samples, device):
    """Per batch, side by side: the batched Fisher, a plain training step, and (on the first ``loop_samples``
    samples) the batch-size-1 loop over the same samples — so every ratio is a median of interleaved pairs."""
    collate = PaddingCollator(0)
    trainer_model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(trainer_model.parameters(), lr=1e-5)
    fisher_times, train_times, loop_pairs, loop_times = [], [], [], []
    slow: dict[str, torch.Tensor] = {}
    for start in range(0, len(data), batch_size):
        chunk = data[start : start + batch_size]
        fisher_times.append(timed(lambda: estimate_fisher(model, chunk, num_samples=len(chunk), batch_size=batch_size,
                                                          collate_fn=collate, progress=False), device))
        batch = {k: v.to(device) for k, v in collate(chunk).items()}

        def step():
            optimizer.zero_grad(set_to_none=True)
            trainer_model(**batch).loss.backward()
            optimizer.step()

        train_times.append(timed(step, device))
        if start < loop_samples:
            means, times = loop_fisher(model, chunk, device)
            loop_times += times
            loop_pairs.append(sum(times) / fisher_times[-1])
            for name, value in means.items():
                slow[name] = slow.get(name, 0) + value * len(chunk)
    subset = data[: len(loop_times)]
    slow = {n: v / len(subset) for n, v in slow.items()}
    fast = estimate_fisher(model, subset, num_samples=len(subset), batch_size=batch_size, collate_fn=collate, progress=False)
    scale = max(float(t.norm()) for t in slow.values())
    rel = max(float((fast[n] - slow[n]).norm()) / max(float(slow[n].norm()), 1e-9 * scale) for n in slow)
    n = len(data)
    result = {
        "samples": n, "batch_size": batch_size,
        "fisher_total_s": sum(fisher_times), "train_pass_total_s": sum(train_times),
        "fisher_batch_median_s": median(fisher_times), "train_step_median_s": median(train_times),
        "fisher_over_train_pass": sum(fisher_times) / sum(train_times),
        "fisher_over_train_median_of_pairs": median([f / t for f, t in zip(fisher_times, train_times)]),
        "loop_samples_timed": len(loop_times), "loop_per_sample_median_s": median(loop_times),
        "loop_over_batched_median_of_pairs": median(loop_pairs), "loop_over_batched_pairs": loop_pairs,
        "loop_estimated_total_s": median(loop_pairs) * sum(fisher_times),
        "loop_vs_batched_max_relative_error": rel,
    }
    return result


def step_time(model, data, batch_size, steps, keep_ratio, device):
    collate = PaddingCollator(0)
    fisher = estimate_fisher(model, data[:256], num_samples=256, batch_size=batch_size, collate_fn=collate, progress=False)
    full = copy.deepcopy(model).train()
    masked = copy.deepcopy(model).train()
    mask = select_mask(fisher, keep_ratio, model=masked)
    engine = DenseMaskEngine(masked, mask).attach()
    opt_full = torch.optim.AdamW(full.parameters(), lr=1e-5, weight_decay=0.01)
    opt_masked = torch.optim.AdamW(engine.trainable_parameters(), lr=1e-4, weight_decay=0.01)
    engine.attach_optimizer(opt_masked)
    batches = [{k: v.to(device) for k, v in collate(data[i * batch_size : (i + 1) * batch_size]).items()}
               for i in range(min(steps, len(data) // batch_size))]

    def step(model_, optimizer, batch):
        optimizer.zero_grad(set_to_none=True)
        model_(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model_.parameters(), 1.0)
        optimizer.step()

    for b in batches[:2]:  # warm-up (allocations, optimizer state)
        step(full, opt_full, b), step(masked, opt_masked, b)
    full_times, masked_times = [], []
    for b in batches:
        full_times.append(timed(lambda: step(full, opt_full, b), device))
        masked_times.append(timed(lambda: step(masked, opt_masked, b), device))
    frozen = sum(1 for n in mask.shapes if mask.kept(n) == 0)
    return {
        "keep_ratio": keep_ratio, "steps": len(batches), "batch_size": batch_size,
        "full_step_median_s": median(full_times), "masked_step_median_s": median(masked_times),
        "masked_over_full": median(masked_times) / median(full_times),
        "masked_over_full_median_of_pairs": median([m / f for m, f in zip(masked_times, full_times)]),
        "tensors_frozen_entirely": frozen, "tensors": len(mask.shapes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loop-samples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--keep-ratio", type=float, default=0.005)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="docs/results/speed.json")
    args = parser.parse_args()
    model = load_model(args.device)
    data = random_token_data(args.samples, args.seq_len, model.config.vocab_size)
    result = {"provenance": provenance(), "args": vars(args)}
    result["fisher"] = fisher_vs_training(model, data, args.batch_size, args.loop_samples, args.device)
    print("fisher:", result["fisher"], flush=True)
    result["step"] = step_time(model, data, args.batch_size, args.steps, args.keep_ratio, args.device)
    print("step:", result["step"], flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
