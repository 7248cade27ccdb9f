"""Peak memory of the Fisher pass on decoders with tied input/output embeddings (GPT-2 small, SmolLM2-135M).

    python benchmarks/fisher_memory.py --out docs/results/fisher_memory_cpu.json

Each model runs in a fresh process: load, reset the resident high-water mark, then one Fisher pass over
--samples causal-LM sequences of --seq-len tokens at --batch-size (every parameter scored, the FISH Mask
setting). Reported beside the peak: the model's size, and the batch x vocab x hidden buffer that scoring
the tied table sample by sample avoids (what a batch-sized per-sample buffer of that table would cost).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, rss_mb, write_json  # noqa: E402

MODELS = ("gpt2-small", "smollm2")


def build(name: str):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if name == "gpt2-small":
        return GPT2LMHeadModel(GPT2Config())  # 124M, random init: memory does not depend on the weights
    from sparsepeft.models.catalog import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"))



def worker(args) -> dict:
    from sparsepeft import estimate_fisher

    model = build(args.model)
    vocab, hidden = model.get_input_embeddings().weight.shape
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(args.samples):
        ids = torch.randint(10, vocab, (args.seq_len,), generator=g).tolist()
        data.append({"input_ids": ids, "attention_mask": [1] * args.seq_len, "labels": list(ids)})
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = rss_mb("VmRSS:")
    start = time.perf_counter()
    estimate_fisher(model, data, num_samples=len(data), batch_size=args.batch_size, progress=False)
    return {"model": args.model, "params": sum(p.numel() for p in model.parameters()), "tied_embeddings": tied,
            "model_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "rss_before_mb": before, "fisher_peak_rss_mb": rss_mb("VmHWM:"),
            "fisher_seconds": time.perf_counter() - start,
            "batch_buffer_avoided_mb": args.batch_size * vocab * hidden * 4 / 2**20 if tied else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="docs/results/fisher_memory_cpu.json")
    args = parser.parse_args()
    if args.model:
        print(json.dumps(worker(args)))
        return
    results = {}
    for name in args.models.split(","):
        child = subprocess.run([sys.executable, __file__, "--model", name, "--samples", str(args.samples), "--seq-len",
                                str(args.seq_len), "--batch-size", str(args.batch_size)],
                               capture_output=True, text=True, check=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(results[name]), flush=True)
    write_json(args.out, {"provenance": provenance(), "args": vars(args), "models": results})


if __name__ == "__main__":
    main()
