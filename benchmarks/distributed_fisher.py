"""Fisher time for N samples on 1 process vs 2 processes (gloo) on this machine.

    python benchmarks/distributed_fisher.py --out docs/results/distributed_fisher_cpu.json

One process uses every core (torch threads = cores); two processes get half the cores each, score
disjoint halves of the same samples and all-reduce the sums. On a 2-core CPU both set-ups have the same
compute, so the ratio shows what sharding costs or saves beyond it (thread scaling vs process
overheads and the all-reduce of one model-sized buffer); on multi-GPU machines the same script shows
the real scaling (pass --backend nccl under torchrun).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, random_token_data, write_json  # noqa: E402


def _model():
    from transformers import AutoModelForSequenceClassification

    from sparsepeft.experiments.pipeline import resolve_model

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2)


def _run(samples: int, seq_len: int, batch_size: int) -> float:
    from sparsepeft import estimate_fisher

    model = _model()
    data = random_token_data(samples, seq_len, model.config.vocab_size)
    start = time.perf_counter()
    estimate_fisher(model, data, num_samples=samples, batch_size=batch_size, progress=False)
    return time.perf_counter() - start


def _worker(rank: int, world: int, init_file: str, threads: int, args, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    seconds = _run(args.samples, args.seq_len, args.batch_size)
    if rank == 0:
        Path(out).write_text(str(seconds))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="docs/results/distributed_fisher_cpu.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    torch.set_num_threads(cores)
    one = _run(args.samples, args.seq_len, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds")
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), max(1, cores // 2), args, out), nprocs=2, join=True)
        two = float(Path(out).read_text())
    result = {"provenance": provenance(), "args": vars(args), "cores": cores, "one_process_s": one, "two_processes_s": two,
              "two_over_one": two / one}
    print(result, flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
