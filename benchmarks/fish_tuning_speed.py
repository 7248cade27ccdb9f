"""Step time of LoRA-FISH against LoRA at the same rank, side by side in one process.

    python benchmarks/fish_tuning_speed.py --out docs/results/fish_tuning_speed_cpu.json

Two copies of the packaged MiniLM with LoRA (same rank, same targets, same head); one trains a FISH
mask of half the LoRA parameters through the dense-mask engine. Steps alternate between the two on the
same batches (forward, backward, clip, AdamW with weight decay), so machine noise hits both alike; the
ratio reported is the median over pairs. Goal: <= 1.03x. The mask is the default one (Fisher after 30
dense warm-up steps, the adapter restored), which spreads its entries over both A and B.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, median, random_token_data, timed, write_json  # noqa: E402

from sparsepeft import DenseMaskEngine  # noqa: E402
from sparsepeft.data.collate import PaddingCollator  # noqa: E402
from sparsepeft.experiments.pipeline import resolve_model  # noqa: E402
from sparsepeft.models.peft import apply_method, tuned_parameters  # noqa: E402
from sparsepeft.selection.fish_tuning import FishTuningConfig, fish_tuning_mask  # noqa: E402


def build(rank: int, method: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2)
    return apply_method(base, method, {"r": rank, "target_modules": ["query", "value"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--out", default="docs/results/fish_tuning_speed_cpu.json")
    args = parser.parse_args()

    vanilla = build(args.rank, args.method)
    masked = copy.deepcopy(vanilla)
    data = random_token_data(args.batch_size * 4, args.seq_len, vanilla.config.vocab_size)
    collate = PaddingCollator(0)
    # the default mask: Fisher after the dense warm-up (so A's entries are ranked too), adapter restored after
    mask = fish_tuning_mask(masked, data, FishTuningConfig(budget=args.budget, num_samples=len(data),
                                                           warmup_batch_size=args.batch_size), progress=False)
    engine = DenseMaskEngine(masked, mask).attach()
    optimizers = {
        "vanilla": torch.optim.AdamW(list(tuned_parameters(vanilla).values()), lr=1e-4, weight_decay=0.01),
        "fish": torch.optim.AdamW(list(engine.trainable_parameters()), lr=1e-4, weight_decay=0.01),
    }
    engine.attach_optimizer(optimizers["fish"])
    models = {"vanilla": vanilla.train(), "fish": masked.train()}
    batches = [collate(data[i : i + args.batch_size]) for i in range(0, len(data), args.batch_size)]

    def step(name, batch):
        model, optimizer = models[name], optimizers[name]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for name in models:  # warm-up: allocator, optimizer state
        step(name, batches[0])
    times = {"vanilla": [], "fish": []}
    for i in range(args.pairs):
        batch = batches[i % len(batches)]
        order = ("vanilla", "fish") if i % 2 == 0 else ("fish", "vanilla")
        for name in order:
            times[name].append(timed(lambda: step(name, batch)))
    result = {
        "provenance": provenance(), "args": vars(args),
        "trainable": {"vanilla": sum(p.numel() for p in tuned_parameters(vanilla).values()), "fish": mask.num_selected},
        "median_step_s": {k: median(v) for k, v in times.items()},
        "fish_over_vanilla_median_of_pairs": median([f / v for f, v in zip(times["fish"], times["vanilla"])]),
    }
    print(result, flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
