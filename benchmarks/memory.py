"""Memory, state and checkpoint size of the sparse-delta engine against the dense-mask engine and full FT.

    python benchmarks/memory.py --out docs/results/memory_cpu.json

Each (model, engine) is measured in its own worker process, so peak resident memory is that engine's
alone: the high-water mark is reset after the model is loaded and the engine attached, then a warm-up
step and the timed steps run. Workers of the engines alternate (A B C A B C ...) for ``--repeats``
rounds, and step times are compared as medians over rounds. Masks are random at the keep ratio (the
memory and time of an engine depend on how many entries and tensors are touched, not on which), except
on MiniLM where ``--fisher`` uses the real FISH mask.

Workers run with glibc's mmap threshold fixed at 1 MiB (``--glibc-default`` to keep glibc's dynamic one):
freed tensors are then returned to the system and the peak is what the phase needs, not what the
allocator's history kept (see the flag's help for the size of that effect).

The mask phase is measured the same way, in a worker of its own (``mask``): the Fisher pass over
``--fisher-samples`` samples at half the training batch (the CLI's default Fisher batch) and the global
top-k. The goal: its peak at or below the sparse engine's training peak, so that FISH end to end (mask,
then train) stays below full fine-tuning's training peak. On MiniLM the same is measured for FISH-Tuning:
its mask phase (LoRA r=16, 30 dense warm-up steps, Fisher, selection to half the LoRA parameters)
against LoRA r=16's training peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, provenance, random_token_data, rss_mb, write_json  # noqa: E402

CONFIGS = {
    # name: (hidden, layers, heads, intermediate) of random-init BERT; "minilm" is the packaged checkpoint
    "minilm": None,
    "bert-20m": (256, 8, 4, 1024),
    "bert-110m": (768, 12, 12, 3072),
    "bert-340m": (1024, 24, 16, 4096),
}
ENGINES = ("full", "dense-mask", "sparse")
PHASES = ENGINES + ("mask",)
LORA_PHASES = ("lora", "lora-fish-mask")  # MiniLM only
LORA = {"r": 16, "target_modules": ["query", "value"]}


def build_model(config: str):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    if config == "minilm":
        from sparsepeft.experiments.pipeline import resolve_model

        return AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2)
    hidden, layers, heads, intermediate = CONFIGS[config]
    return BertForSequenceClassification(BertConfig(hidden_size=hidden, num_hidden_layers=layers,
                                                    num_attention_heads=heads, intermediate_size=intermediate))



def _release_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> float:
    _release_freed_memory()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return rss_mb("VmRSS:")


def _fisher_batch(args) -> int:
    """--fisher-batch-size, or the CLI's own default for this training batch."""
    from sparsepeft.cli.arguments import default_fisher_batch_size

    return args.fisher_batch_size or default_fisher_batch_size(args.batch_size)


def mask_worker(args) -> dict:
    """The mask phase alone: Fisher at half the training batch, then the global top-k (FISH Mask), or
    FISH-Tuning's warm-up + Fisher + selection inside LoRA (``lora-fish-mask``)."""
    from sparsepeft import estimate_fisher, select_mask
    from sparsepeft.models.peft import apply_method
    from sparsepeft.selection.fish_tuning import FishTuningConfig, fish_tuning_mask

    torch.set_num_threads(args.threads)
    model = build_model(args.config).train()
    if args.engine == "lora-fish-mask":
        model = apply_method(model, "lora", dict(LORA))
    data = random_token_data(args.fisher_samples, args.seq_len, model.config.vocab_size)
    rss_before = _reset_peak()
    start = time.perf_counter()
    if args.engine == "lora-fish-mask":
        config = FishTuningConfig(num_samples=len(data), fisher_batch_size=_fisher_batch(args),
                                  warmup_batch_size=args.batch_size)
        mask = fish_tuning_mask(model, data, config, progress=False)
    else:
        fisher = estimate_fisher(model, data, num_samples=len(data), batch_size=_fisher_batch(args), progress=False)
        mask = select_mask(fisher, args.keep_ratio, model=model)
        del fisher
    return {"config": args.config, "engine": args.engine, "params": sum(p.numel() for p in model.parameters()),
            "rss_before_train_mb": rss_before, "peak_rss_train_mb": rss_mb("VmHWM:"),
            "mask_seconds": time.perf_counter() - start, "selected": mask.num_selected,
            "fisher_batch_size": _fisher_batch(args)}


def worker(args) -> dict:
    from sparsepeft import DenseMaskEngine, SparseDeltaEngine, estimate_fisher, random_mask, select_mask
    from sparsepeft.data import PaddingCollator
    from sparsepeft.engines import optimizer_state_bytes
    from sparsepeft.models.peft import apply_method

    if args.engine in ("mask", "lora-fish-mask"):
        return mask_worker(args)
    torch.set_num_threads(args.threads)
    model = build_model(args.config).train()
    data = random_token_data(args.batch_size * (args.steps + 1), args.seq_len, model.config.vocab_size)
    collate = PaddingCollator(0)
    batches = [collate(data[i * args.batch_size : (i + 1) * args.batch_size]) for i in range(args.steps + 1)]
    mask, engine = None, None
    if args.engine == "lora":
        model = apply_method(model, "lora", dict(LORA))
        params = [p for p in model.parameters() if p.requires_grad]
    elif args.engine != "full":
        if args.fisher:
            fisher = estimate_fisher(model, data[:256], num_samples=256, batch_size=32, progress=False)
            mask = select_mask(fisher, args.keep_ratio, model=model)
            del fisher
        else:
            mask = random_mask(model, args.keep_ratio, seed=0)
        engine = (SparseDeltaEngine if args.engine == "sparse" else DenseMaskEngine)(model, mask).attach()
        params = list(engine.trainable_parameters())
    if args.engine == "full":
        params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    if engine is not None:
        engine.attach_optimizer(optimizer)
    _release_freed_memory()  # the Fisher pass's freed blocks would otherwise count as resident
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    rss_before = rss_mb("VmRSS:")
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if i:  # the first step is warm-up (optimizer state is created there)
            times.append(time.perf_counter() - start)
    result = {
        "config": args.config, "engine": args.engine,
        "params": sum(p.numel() for n, p in model.named_parameters() if not n.endswith("_sparse_values")),
        "rss_before_train_mb": rss_before, "peak_rss_train_mb": rss_mb("VmHWM:"),
        "step_median_s": median(times), "step_times_s": times,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "trainable_state_bytes": engine.trainable_state_bytes() if engine else sum(p.numel() * 4 for p in params),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(engine, SparseDeltaEngine):
            result["checkpoint_bytes"] = engine.save_delta(os.path.join(tmp, "delta.safetensors"))
        elif args.engine == "lora":
            model.save_pretrained(tmp)
            result["checkpoint_bytes"] = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
        else:
            if engine is not None:
                engine.detach()
            model.save_pretrained(tmp)
            result["checkpoint_bytes"] = os.path.getsize(os.path.join(tmp, "model.safetensors"))
    return result


def run_worker(args, config: str, engine: str, fisher: bool) -> dict:
    command = [sys.executable, __file__, "--worker", "--config", config, "--engine", engine, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--keep-ratio", str(args.keep_ratio),
               "--threads", str(args.threads), "--fisher-samples", str(args.fisher_samples)] + (["--fisher"] if fisher else []) \
        + (["--fisher-batch-size", str(args.fisher_batch_size)] if args.fisher_batch_size else [])
    env = dict(os.environ)
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # see --glibc-default
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    by_engine = {}
    for run in runs:
        by_engine.setdefault(run["engine"], []).append(run)
    summary = {e: {"params": rs[0]["params"],
                   "step_median_s": median([r["step_median_s"] for r in rs]) if "step_median_s" in rs[0] else None,
                   "mask_seconds": median([r["mask_seconds"] for r in rs]) if "mask_seconds" in rs[0] else None,
                   "peak_rss_train_mb": median([r["peak_rss_train_mb"] for r in rs]),
                   "rss_before_train_mb": median([r["rss_before_train_mb"] for r in rs]),
                   "optimizer_state_bytes": rs[0].get("optimizer_state_bytes"),
                   "trainable_state_bytes": rs[0].get("trainable_state_bytes"),
                   "checkpoint_bytes": rs[0].get("checkpoint_bytes")} for e, rs in by_engine.items()}
    if {"sparse", "dense-mask", "full"} <= summary.keys():
        s, d, f = summary["sparse"], summary["dense-mask"], summary["full"]
        summary["ratios"] = {
            "optimizer_state_sparse_over_full_adamw": s["optimizer_state_bytes"] / f["optimizer_state_bytes"],
            "optimizer_state_sparse_over_dense_mask": s["optimizer_state_bytes"] / d["optimizer_state_bytes"],
            "peak_rss_sparse_over_dense_mask": s["peak_rss_train_mb"] / d["peak_rss_train_mb"],
            "step_time_sparse_over_dense_mask": s["step_median_s"] / d["step_median_s"],
            "checkpoint_sparse_over_dense": s["checkpoint_bytes"] / f["checkpoint_bytes"],
        }
    if {"mask", "sparse", "full"} <= summary.keys():
        m, s, f = summary["mask"], summary["sparse"], summary["full"]
        summary["ratios"]["mask_peak_over_sparse_train_peak"] = m["peak_rss_train_mb"] / s["peak_rss_train_mb"]
        summary["ratios"]["fish_end_to_end_over_full_train_peak"] = (
            max(m["peak_rss_train_mb"], s["peak_rss_train_mb"]) / f["peak_rss_train_mb"])
    if set(LORA_PHASES) <= summary.keys():
        summary.setdefault("ratios", {})["lora_fish_mask_peak_over_lora_train_peak"] = (
            summary["lora-fish-mask"]["peak_rss_train_mb"] / summary["lora"]["peak_rss_train_mb"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default="minilm")
    parser.add_argument("--configs", default="minilm,bert-20m,bert-110m,bert-340m")
    parser.add_argument("--engine", default="sparse")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--scaling-batch-size", type=int, default=8)
    parser.add_argument("--scaling-steps", type=int, default=2)
    parser.add_argument("--keep-ratio", type=float, default=0.005)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fisher", action="store_true")
    parser.add_argument("--fisher-samples", type=int, default=64, help="samples of the mask phase's Fisher pass")
    parser.add_argument("--fisher-batch-size", type=int, default=None,
                        help="the mask phase's Fisher batch (default: half the training batch, as the CLI)")
    parser.add_argument("--phases", default=",".join(PHASES + LORA_PHASES),
                        help="which workers to run (e.g. 'mask' to measure the mask phase alone)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="keep glibc's dynamic mmap threshold in the workers. By default they run with "
                             "MALLOC_MMAP_THRESHOLD_=1 MiB, so tensors over 1 MiB are mapped and unmapped and the "
                             "RSS follows live memory: with the dynamic threshold, freed activations stay in the "
                             "heap and the measured peak depends on allocation order (LoRA on MiniLM, batch 32: "
                             "2194 MB one way and 2513 MB another for the same steps, both 1608-1611 MB fixed).")
    parser.add_argument("--out", default="docs/results/memory.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    result = {"provenance": provenance(), "args": vars(args), "models": {}}
    for config in args.configs.split(","):
        main_run = config == "minilm"
        sub = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size if main_run else args.scaling_batch_size,
                                    "steps": args.steps if main_run else args.scaling_steps})
        runs = []
        for _ in range(args.repeats if main_run else 1):
            for engine in [p for p in PHASES + (LORA_PHASES if main_run else ()) if p in args.phases.split(",")]:
                runs.append(run_worker(sub, config, engine, fisher=main_run))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "step_times_s"}), flush=True)
        result["models"][config] = {"batch_size": sub.batch_size, "runs": runs, "summary": summarise(runs)}
        write_json(args.out, result)
    print(json.dumps({c: m["summary"].get("ratios") for c, m in result["models"].items()}, indent=2))


if __name__ == "__main__":
    main()
