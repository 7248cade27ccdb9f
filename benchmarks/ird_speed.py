"""Time of an IRD search against one plain FISH mask estimation on the same initial samples.

    python benchmarks/ird_speed.py --out docs/results/ird_speed_cpu.json

MiniLM, N random full-length sequences (plus the held-out samples IRD's criterion needs). Runs
FISH, IRD, FISH in one process and reports IRD / median(FISH). Goal: <= 3x. The expected ratio is
(sum of the rounds' sample counts + held-out samples) / N plus the per-sample mass bookkeeping:
1024 + 512 + 256 + 256 = 2048 samples for the defaults, i.e. ~2x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, median, random_token_data, write_json  # noqa: E402

from sparsepeft import estimate_fisher, select_mask  # noqa: E402
from sparsepeft.experiments.pipeline import resolve_model  # noqa: E402
from sparsepeft.selection.ird import IRDConfig, ird_search  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="docs/results/ird_speed_cpu.json")
    args = parser.parse_args()
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2)
    config = IRDConfig(num_samples=args.samples, rounds=args.rounds, fisher_batch_size=args.batch_size)
    data = random_token_data(args.samples + config.criterion_samples, args.seq_len, model.config.vocab_size)

    def fish() -> float:
        start = time.perf_counter()
        fisher = estimate_fisher(model, data, num_samples=args.samples, batch_size=args.batch_size, progress=False)
        select_mask(fisher, 0.005, model=model)
        return time.perf_counter() - start

    fish_times = [fish()]
    start = time.perf_counter()
    result = ird_search(model, data, 0.005, config, progress=False)
    ird_time = time.perf_counter() - start
    fish_times.append(fish())
    payload = {
        "provenance": provenance(), "args": vars(args),
        "fish_seconds": fish_times, "ird_seconds": ird_time,
        "ird_over_fish": ird_time / median(fish_times),
        "samples_per_round": [r["samples"] for r in result.rounds],
        "criterion_samples": config.criterion_samples,
        "rounds": result.rounds,
    }
    print({k: v for k, v in payload.items() if k != "rounds"}, flush=True)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
