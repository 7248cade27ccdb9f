"""SmolLM2-135M training step by arm: peak resident memory and step time, side by side, and glibc's mmap
threshold (fixed at 1 MiB against glibc's dynamic default) as a second axis.

    python benchmarks/allocator_llm.py --out docs/results/allocator_llm_cpu.json
    python benchmarks/allocator_llm.py --arms lora,full,sparse-random-linear,sparse-random-all \
        --allocators glibc-dynamic --max-seq-length 256 --steps 4 --repeats 2 --threads 1 \
        --out docs/results/llm_step_arms_cpu.json           # and --task timedial --threads 2 (long prompts)

Arms: LoRA r=8 (q,k,v,o,up,down; dropout 0.1, which ``apply_method`` sets as the CLI does), full
fine-tuning, and the sparse engine at LoRA r=8's exact count (1,935,360 entries) with a random mask over
the blocks' linear weights (the suite's ``random-linear-lora8``) or over every weight (every tensor
touched, the embedding included, as the Fisher mask of ``fish-lora8`` does; the engine's cost depends on
which tensors it touches and how many entries, not on which entries, so a random mask stands in for the
Fisher pass).

glibc starts with a 128 KiB mmap threshold and raises it (up to 32 MiB) each time a mapped block is
freed, so after the first step most activations come from the heap, where freed memory stays resident
and the peak depends on the order of allocations. Fixed at 1 MiB, every tensor over 1 MiB is mapped
and unmapped, and the resident set follows live memory, at the price of fresh zeroed pages. Each (arm,
allocator) runs in its own worker process; workers alternate for ``--repeats`` rounds. A worker loads the
model, resets the resident high-water mark, and runs ``--steps`` training steps of batch ``--batch-size``
on social_iqa (answer-only logits, AdamW, clipping), after one untimed warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, rss_mb, write_json  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
ALLOCATORS = {"fixed-1MiB": str(1 << 20), "glibc-dynamic": None}  # -> MALLOC_MMAP_THRESHOLD_
ARMS = ("lora", "full", "sparse-random-linear", "sparse-random-all")


def worker(args) -> dict:
    from sparsepeft.data.collate import AnswerLogitsCollator
    from sparsepeft.data.multiple_choice import load_multiple_choice, training_features
    from sparsepeft.experiments.pipeline import load_model_and_tokenizer
    from sparsepeft.models.peft import apply_method

    torch.set_num_threads(args.threads)
    task = load_multiple_choice(Path(args.data_dir) / args.task / "task.json")
    model, tokenizer = load_model_and_tokenizer(args.model, task)
    lora = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS}
    if args.arm == "lora":
        model = apply_method(model, "lora", lora)
    model.train()
    if args.arm.startswith("sparse-random-"):
        from sparsepeft import SparseDeltaEngine, random_mask, reference_count
        from sparsepeft.selection.candidates import candidate_parameters

        candidates = candidate_parameters(model, args.arm.removeprefix("sparse-random-"))
        mask = random_mask(model, params=list(candidates), budget=reference_count(model, "lora", lora), seed=0)
        engine = SparseDeltaEngine(model, mask).attach()
        optimizer = torch.optim.AdamW(list(engine.trainable_parameters()), lr=1e-5)
        engine.attach_optimizer(optimizer)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    features = training_features(task.train[: args.batch_size * (args.steps + 1)], tokenizer, args.max_seq_length)
    collate = AnswerLogitsCollator(pad_token_id=tokenizer.pad_token_id or 0)
    batches = [collate(features[i:i + args.batch_size]) for i in range(0, len(features), args.batch_size)]
    with open("/proc/self/clear_refs", "w") as handle:  # the high-water mark from here on
        handle.write("5")
    before = rss_mb("VmRSS:")
    seconds = []
    for batch in batches:
        start = time.perf_counter()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return {"arm": args.arm, "trainable": sum(p.numel() for p in trainable), "rss_before_train_mb": before,
            "peak_rss_train_mb": rss_mb("VmHWM:"), "step_seconds": seconds[1:],
            "step_median_s": statistics.median(seconds[1:])}


def run_worker(args, arm: str, allocator: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--arm", arm, "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--threads", str(args.threads), "--max-seq-length", str(args.max_seq_length),
               "--model", args.model, "--data-dir", args.data_dir, "--task", args.task]
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if ALLOCATORS[allocator] is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = ALLOCATORS[allocator]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return {**json.loads(output.strip().splitlines()[-1]), "allocator": allocator}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", default="lora")
    parser.add_argument("--arms", default="lora,full")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data/bigbench")
    parser.add_argument("--task", default="social_iqa", help="a BIG-bench task folder (timedial: long prompts)")
    parser.add_argument("--allocators", default=",".join(ALLOCATORS))
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/results/allocator_llm_cpu.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    allocators, arms = args.allocators.split(","), args.arms.split(",")
    for flag, given, known in (("--allocators", allocators, ALLOCATORS), ("--arms", arms, ARMS)):
        if unknown := [g for g in given if g not in known]:  # before any worker starts
            parser.error(f"{flag} {unknown}: choose among {list(known)}")
    runs = []
    for repeat in range(args.repeats):  # alternate the order, so that drift on the machine falls on every arm
        for arm in arms if repeat % 2 == 0 else list(reversed(arms)):
            for allocator in allocators if repeat % 2 == 0 else list(reversed(allocators)):
                runs.append(run_worker(args, arm, allocator))
                print(f"{arm} {allocator}: peak {runs[-1]['peak_rss_train_mb']:.0f} MB, "
                      f"step {runs[-1]['step_median_s']:.2f} s", flush=True)
    summary = {}
    for arm in arms:
        cells = {a: [r for r in runs if r["arm"] == arm and r["allocator"] == a] for a in allocators}
        summary[arm] = {a: {"peak_rss_train_mb": [r["peak_rss_train_mb"] for r in rs],
                            "step_median_s": statistics.median(r["step_median_s"] for r in rs)} for a, rs in cells.items()}
        summary[arm]["trainable"] = next(r["trainable"] for r in runs if r["arm"] == arm)
        if {"fixed-1MiB", "glibc-dynamic"} <= set(allocators):
            fixed, dynamic = summary[arm]["fixed-1MiB"], summary[arm]["glibc-dynamic"]
            summary[arm]["peak_fixed_over_dynamic"] = statistics.median(fixed["peak_rss_train_mb"]) / statistics.median(
                dynamic["peak_rss_train_mb"])
            summary[arm]["step_fixed_over_dynamic"] = fixed["step_median_s"] / dynamic["step_median_s"]
    if "lora" in arms:  # every arm against LoRA, under the same allocator
        for arm in arms:
            summary[arm]["over_lora"] = {a: {
                "step": summary[arm][a]["step_median_s"] / summary["lora"][a]["step_median_s"],
                "peak": statistics.median(summary[arm][a]["peak_rss_train_mb"])
                / statistics.median(summary["lora"][a]["peak_rss_train_mb"])} for a in allocators}
    write_json(args.out, {"provenance": provenance(sys.argv), "args": vars(args), "runs": runs, "summary": summary})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
