"""The mask phase at the scale LLM users work: selection, Fisher, attach and the training step, by model size.

Two parts, one result file per run under --out (a run whose file exists is skipped, so the sweep resumes):

* ``selection``: global top-k over N random float32 scores (0.5%) split into model-like tensors, for four N;
  time per N (median of repeats) and, at the smaller sizes, the streaming pool selection it replaced
  (``_pool_select`` below, kept here only as the baseline) with a check that both keep the same entries.
* ``model``: LLaMA-shaped random-init models (134M, 374M, 1.1B on this CPU; up to 7B on a GPU). Per size,
  each arm in its own process, so every peak is that arm's own: ``mask`` (the Fisher batch planned from the
  training step, the Fisher, the selection, the sparse engine's attach — timed part by part — and the mask
  phase's peak), ``fish`` (the sparse engine on that Fisher mask), ``fish-random`` (the sparse engine on a
  random 0.5% mask, spread over every tensor: a random-init model's Fisher mask sits in a few tensors and
  flatters FISH's step time), ``lora`` (r=16 on every linear layer of the blocks) and ``full`` (where it fits).
  Extra arm: ``lora-fish`` (that LoRA masked to r=8's count by the dense-mask engine, as FISH-Tuning trains), for
  its peak; ``--part lora-fish-step`` times its step against LoRA's, part by part.
  Peak: RSS on the CPU (workers run with glibc's mmap threshold fixed at 1 MiB, so a peak is what the arm
  needs), allocated memory on a GPU; step time: median of the timed steps.

    python benchmarks/scale.py --part selection
    python benchmarks/scale.py --part model --sizes 134m,374m,1.1b
    python benchmarks/scale.py --part precision        # bf16-autocast Fisher vs float32 on real models
    python benchmarks/scale.py --part order --fisher-samples 64 --batch-size 8 --repeats 2   # batching by length
    python benchmarks/scale.py --part summary          # docs/results/scale_cpu.json and the table

* ``precision``: the Fisher under bf16 autocast against the float32 Fisher, on MiniLM (SST-2) and SmolLM2-135M
  (social_iqa), same samples: overlap of the 0.5% masks they select, and the time of each pass.
* ``order``: the Fisher pass over the same draw of samples, batched in draw order (as before) and longest first
  (as now), on SmolLM2-135M (the commonsense suite, where timedial's long prompts sit among short ones) and
  MiniLM (SST-2): time of each pass, tokens computed with padding, and the overlap of the masks they select.
* ``cli``: ``sparsepeft train --method fish`` on SmolLM2-135M (social_iqa) and MiniLM (SST-2) for a few steps with
  the default (planned) Fisher batch: the mask phase's peak against the training phase's, from results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, provenance, write_json  # noqa: E402

SIZES = {  # LLaMA shapes: hidden, layers, heads, kv heads, intermediate (vocabulary 32000)
    "134m": (768, 12, 12, 12, 2048),
    "374m": (1024, 24, 16, 16, 2816),
    "1.1b": (2048, 22, 32, 4, 5632),  # TinyLlama's
    "3b": (3200, 26, 32, 32, 8640),
    "7b": (4096, 32, 32, 32, 11008),
}
SELECTION_SIZES = (25_000_000, 50_000_000, 100_000_000, 200_000_000, 1_100_000_000)
ARMS = ("mask", "fish", "fish-random", "lora", "full", "lora-fish")


# ----------------------------------------------------------------------------------------------- selection
def _model_like_scores(total: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random scores in tensors of LLaMA-like sizes (one large embedding, then blocks of mixed sizes)."""
    g = torch.Generator().manual_seed(seed)
    sizes, left = [], total
    sizes.append(total // 20)  # an embedding
    left -= sizes[0]
    pattern = [4, 4, 1, 1, 11, 11, 11]  # q, o, k, v (GQA), gate, up, down in relative sizes
    unit = max(1, left // (sum(pattern) * 8))
    while left > 0:
        for part in pattern:
            size = min(left, part * unit)
            if size <= 0:
                break
            sizes.append(size)
            left -= size
    return {f"t{i}": torch.rand(size, generator=g) for i, size in enumerate(sizes)}


def _pool_select(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The selection this release replaced: each 1M-entry chunk's top-k merged into a pool of k (O(N k))."""
    pool = torch.empty(0)
    for value in scores.values():
        flat = torch.nan_to_num(value.reshape(-1).float(), nan=float("-inf"))
        for offset in range(0, flat.numel(), 1 << 20):
            chunk = flat[offset:offset + (1 << 20)]
            pool = torch.cat([pool, torch.topk(chunk, min(k, chunk.numel()), sorted=False).values])
            if pool.numel() > k:
                pool = torch.topk(pool, k, sorted=False).values
    threshold = pool.min()
    out, needed = {}, k - sum(int((v > threshold).sum()) for v in scores.values())
    for name, value in scores.items():
        flat = value.reshape(-1)
        chosen = (flat > threshold).nonzero().flatten()
        if needed > 0:
            tied = (flat == threshold).nonzero().flatten()[:needed]
            needed -= tied.numel()
            chosen = torch.cat([chosen, tied]).sort().values
        out[name] = chosen
    return out


def run_selection(out: Path, repeats: int, baseline_up_to: int, device: str = "cpu") -> None:
    """Global top-k of 0.5% at each size, the scores on ``device``; on a GPU the entries are also compared with
    the CPU's selection of the same scores (the pool baseline runs on the CPU only)."""
    from sparsepeft.selection.topk import global_topk

    for total in SELECTION_SIZES:
        path = out / f"selection_{total}.json"
        if path.exists():
            continue
        scores = _model_like_scores(total)
        on_device = {n: v.to(device) for n, v in scores.items()}
        k = round(0.005 * total)
        times, chosen = [], None
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            chosen = global_topk(on_device, k)
            _sync(device)
            times.append(time.perf_counter() - start)
        result = {"part": "selection", "device": device, "scores": total, "k": k, "tensors": len(scores),
                  "seconds": median(times), "seconds_all": times, **provenance()}
        if device != "cpu":
            reference = global_topk(scores, k)
            result["same_entries_as_cpu"] = all(torch.equal(reference[n], chosen[n]) for n in scores)
        elif total <= baseline_up_to:
            start = time.perf_counter()
            old = _pool_select(scores, k)
            result["pool_select_seconds"] = time.perf_counter() - start
            result["same_entries_as_pool_select"] = all(torch.equal(old[n], chosen[n]) for n in scores)
        del on_device
        write_json(path, result)
        print(json.dumps({k: v for k, v in result.items() if k in ("scores", "seconds", "pool_select_seconds",
                                                                   "same_entries_as_cpu")}))


# ----------------------------------------------------------------------------------------------- model arms
def _build_model(size: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter = SIZES[size]
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model


def _examples(n: int, seq_len: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32000, (n, seq_len), generator=g)
    return [{"input_ids": row.tolist(), "attention_mask": [1] * seq_len, "labels": row.tolist()} for row in ids]


class _Peak:
    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")

    def mb(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM:"))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _train_steps(model, params, batches, steps: int, device: str, autocast, attach=None) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device == "cuda")
    if attach is not None:  # the dense-mask engine's optimizer hooks
        attach(optimizer)
    return optimizer, [_one_step(model, optimizer, batches[i % len(batches)], device, autocast) for i in range(steps)]


def _one_step(model, optimizer, batch, device, autocast) -> float:
    _sync(device)
    start = time.perf_counter()
    with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_arm(model, arm: str):
    """``lora``: LoRA r=16 on every linear layer of the blocks; ``lora-fish``: the same LoRA masked to r=8's count
    by the dense-mask engine, as FISH-Tuning trains (a random half: the cost depends on how many entries and
    tensors, not which); ``lora-fish-indices``: the same with the engine's flat-index form forced. Returns the
    model, its trainable parameters and the engine (None for LoRA)."""
    from peft import LoraConfig, get_peft_model

    from sparsepeft import DenseMaskEngine, random_mask
    from sparsepeft.engines import dense_mask

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    if arm == "lora":
        return model, [p for p in model.parameters() if p.requires_grad], None
    mask = random_mask(model, 0.5, always_train=())
    form = dense_mask.FollowingIndex.for_entries
    if arm == "lora-fish-indices":
        dense_mask.FollowingIndex.for_entries = classmethod(lambda cls, idx, numel, device="cpu": cls(idx, device))
    try:
        engine = DenseMaskEngine(model, mask).attach()
    finally:
        dense_mask.FollowingIndex.for_entries = form
    return model, list(engine.trainable_parameters()), engine


def run_arm(size: str, arm: str, out: Path, args) -> dict:
    from sparsepeft import SparseDeltaEngine, estimate_fisher, random_mask, select_mask
    from sparsepeft.data.collate import causal_lm_collator
    from sparsepeft.importance.memory import plan_fisher_batch
    from sparsepeft.selection import SparseMask

    device = args.device
    autocast = torch.bfloat16 if args.bf16 else None
    model = _build_model(size, device)
    collate = causal_lm_collator(model, 0)
    train = _examples(max(args.fisher_samples, args.batch_size * 2), args.seq_len)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(train[i * args.batch_size:(i + 1) * args.batch_size]).items()}
               for i in range(2)]
    result = {"part": "model", "size": size, "arm": arm, "params": sum(p.numel() for p in model.parameters()),
              "device": device, "precision": "bf16-autocast" if autocast else "fp32", "batch_size": args.batch_size,
              "seq_len": args.seq_len}
    mask_path = out / f"mask_{size}.safetensors"
    if arm == "mask":
        peak = _Peak(device)
        scored = dict(model.named_parameters())
        start = time.perf_counter()
        plan = plan_fisher_batch(model, train, collate, args.batch_size, scored, train_autocast=autocast,
                                 fisher_autocast=autocast)
        result["plan_seconds"] = time.perf_counter() - start
        result["fisher_batch_plan"] = plan.to_dict()
        _sync(device)
        start = time.perf_counter()
        if len(plan.groups) > 1:  # the accumulator does not fit beside the activations: one pass per group
            from sparsepeft.selection.grouped import grouped_fisher_mask

            mask = grouped_fisher_mask(model, train, plan.groups, args.keep_ratio, always_train=(),
                                       num_samples=args.fisher_samples, batch_size=plan.batch_size,
                                       collate_fn=collate, progress=False, autocast_dtype=autocast)
            _sync(device)
            result["fisher_and_selection_seconds"] = time.perf_counter() - start
        else:
            fisher = estimate_fisher(model, train, num_samples=args.fisher_samples, batch_size=plan.batch_size,
                                     collate_fn=collate, progress=False, autocast_dtype=autocast)
            _sync(device)
            result["fisher_seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            mask = select_mask(fisher, args.keep_ratio, model=model, always_train=())
            _sync(device)
            result["selection_seconds"] = time.perf_counter() - start
            del fisher
        start = time.perf_counter()
        engine = SparseDeltaEngine(model, mask).attach()
        _sync(device)
        result["attach_seconds"] = time.perf_counter() - start
        engine.detach()
        result["mask_peak_mb"] = peak.mb()
        result["mask_tensors"] = sum(1 for n in mask.shapes if mask.kept(n))
        result["candidate_tensors"] = len(mask.shapes)
        mask.save(mask_path)
        start = time.perf_counter()  # one read of every weight, the yardstick for attach
        for param in model.parameters():
            float(param.detach().sum())
        _sync(device)
        result["read_every_weight_seconds"] = time.perf_counter() - start
        return result
    if arm in ("fish", "fish-random"):
        mask = SparseMask.load(mask_path) if arm == "fish" else random_mask(model, args.keep_ratio, always_train=())
        result["mask_tensors"] = sum(1 for n in mask.shapes if mask.kept(n))
        peak = _Peak(device)
        engine = SparseDeltaEngine(model, mask).attach()
        params = list(engine.trainable_parameters())
    elif arm in ("lora", "lora-fish"):
        model, params, engine = _lora_arm(model, arm)
        if engine is not None:
            result["mask_tensors"] = sum(1 for n in engine.mask.shapes if engine.mask.kept(n))
        peak = _Peak(device)  # after attaching: the arms' peaks cover the training steps alike
    else:
        peak = _Peak(device)
        params = list(model.parameters())
    model.train()
    optimizer, times = _train_steps(model, params, batches, args.steps + 1, device, autocast,
                                    attach=engine.attach_optimizer if arm == "lora-fish" else None)
    result["step_seconds"] = median(times[1:])
    result["step_seconds_all"] = times
    result["train_peak_mb"] = peak.mb()
    return result


def run_lora_fish_step(out: Path, args) -> None:
    """LoRA r=16 against LoRA-FISH (the same LoRA masked to r=8's count by the dense-mask engine, a random half)
    in its boolean form and with the index form forced, the three models in one process and their steps
    interleaved, so that the machine's noise falls on all three alike: median forward, backward and optimizer
    time per arm (AdamW, no weight decay: Trainer's default)."""
    from sparsepeft.data.collate import causal_lm_collator

    device, autocast = args.device, (torch.bfloat16 if args.bf16 else None)
    arms = {}
    for arm in ("lora", "lora-fish", "lora-fish-indices"):
        model, params, engine = _lora_arm(_build_model(args.sizes.split(",")[0], device), arm)
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device == "cuda")
        if engine is not None:
            engine.attach_optimizer(optimizer)
        model.train()
        arms[arm] = (model, optimizer, {"forward": [], "backward": [], "optimizer": []})
    collated = causal_lm_collator(arms["lora"][0], 0)(_examples(args.batch_size, args.seq_len))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}
    for step in range(args.steps + 2):
        for arm, (model, optimizer, times) in arms.items():
            marks = [time.perf_counter()]
            with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
                loss = model(**batch).loss
            _sync(device)
            marks.append(time.perf_counter())
            loss.backward()
            _sync(device)
            marks.append(time.perf_counter())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            marks.append(time.perf_counter())
            if step >= 2:  # two warm-up steps
                for key, a, b in zip(times, marks, marks[1:]):
                    times[key].append(b - a)
    result = {"part": "lora_fish_step", "size": args.sizes.split(",")[0], "device": device,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "arms": {}}
    for arm, (_, _, times) in arms.items():
        medians = {key: median(values) for key, values in times.items()}
        medians["step"] = median([sum(parts) for parts in zip(*times.values())])
        result["arms"][arm] = medians
    for arm, medians in result["arms"].items():
        medians["step_vs_lora"] = medians["step"] / result["arms"]["lora"]["step"]
    write_json(out / f"lora_fish_step_{result['size']}_b{args.batch_size}x{args.seq_len}.json", {**result, **provenance()})
    print(json.dumps(result["arms"], indent=1))


def _worker_env() -> dict:
    """glibc's mmap threshold fixed at 1 MiB (as benchmarks/memory.py does): with its dynamic threshold, freed
    tensors stay in the heap and an RSS peak depends on allocation order (docs/benchmarks.md), not on need."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def run_models(out: Path, args) -> None:
    """Each (size, arm) in its own process: an arm's peak is its own, not the previous arm's leftovers."""
    for size in args.sizes.split(","):
        for arm in args.arms.split(","):
            path = out / f"model_{size}_{arm}.json"
            if path.exists():
                continue
            command = [sys.executable, __file__, "--part", "one", "--size", size, "--arm", arm, "--out", str(out),
                       "--device", args.device, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                       "--steps", str(args.steps), "--fisher-samples", str(args.fisher_samples),
                       "--keep-ratio", str(args.keep_ratio)] + (["--bf16"] if args.bf16 else [])
            print("running", size, arm, flush=True)
            finished = subprocess.run(command, env=_worker_env())
            if finished.returncode != 0:
                print(f"{size} {arm} failed (exit {finished.returncode}); next", flush=True)


def summarize(out: Path, target: Path) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    selection = sorted((r for r in runs if r["part"] == "selection"), key=lambda r: r["scores"])
    models = [r for r in runs if r["part"] == "model"]
    lines = ["| scores | k | selection (s) | per 1e8 scores (s) | replaced pool select (s) | same entries |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in selection:
        pool = f"{r['pool_select_seconds']:.1f}" if "pool_select_seconds" in r else "–"
        same = r.get("same_entries_as_pool_select", r.get("same_entries_as_cpu", "–"))
        lines.append(f"| {r['scores']:.1e} | {r['k']:,} | {r['seconds']:.2f} | {r['seconds'] / r['scores'] * 1e8:.2f} | "
                     f"{pool} | {same} |")
    lines += ["", "| model | arm | peak (MB) | step (s) | Fisher batch | Fisher (s) | selection (s) | attach (s) | "
              "read all weights (s) | tensors in mask |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    # Fisher batch "b x G": G passes over groups of tensors (the accumulator did not fit beside b samples at once)
    for r in sorted(models, key=lambda r: (r["params"], ARMS.index(r["arm"]))):
        peak = r.get("mask_peak_mb", r.get("train_peak_mb"))
        plan = r.get("fisher_batch_plan") or {}
        cell = lambda key: f"{r[key]:.2f}" if key in r else "–"  # noqa: E731
        tensors = f"{r['mask_tensors']}" + (f" of {r['candidate_tensors']}" if "candidate_tensors" in r else "") \
            if "mask_tensors" in r else "–"
        lines.append(f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['arm']} | {peak:,.0f} | {cell('step_seconds')} | "
                     f"{plan.get('batch_size', '–')}{' x ' + str(plan['groups']) if plan.get('groups', 1) > 1 else ''} | "
                     f"{cell('fisher_seconds') if 'fisher_seconds' in r else cell('fisher_and_selection_seconds')} | "
                     f"{'incl.' if 'fisher_and_selection_seconds' in r else cell('selection_seconds')} | "
                     f"{cell('attach_seconds')} | {cell('read_every_weight_seconds')} | {tensors} |")
    step_runs = [r for r in runs if r["part"] == "lora_fish_step"]
    for r in step_runs:  # --part lora-fish-step: three models in one process, steps interleaved
        lines += ["", f"LoRA-FISH's step, {r['size']} on {r['device']}, batch {r['batch_size']} x {r['seq_len']}, "
                  f"median of {r['steps']} interleaved steps (ms):", "",
                  "| arm | forward | backward | optimizer | step | / lora |", "| --- | --- | --- | --- | --- | --- |"]
        for arm, m in r["arms"].items():
            lines.append(f"| {arm} | {1e3 * m['forward']:.1f} | {1e3 * m['backward']:.1f} | {1e3 * m['optimizer']:.1f} | "
                         f"{1e3 * m['step']:.1f} | {m['step_vs_lora']:.2f} |")
    precision = [r for r in runs if r["part"] == "precision"]
    if precision:
        lines += ["", "| model (task) | Fisher samples | mask entries | same entries, bf16 vs fp32 | excluding "
                  "tensors kept whole | fp32 Fisher (s) | bf16 Fisher (s) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in precision:
            lines.append(f"| {r['model']} ({r['task']}) | {r['samples']} | {r['selected']:,} | {100 * r['overlap']:.1f}% | "
                         f"{100 * r['overlap_ranked']:.1f}% | {r['fp32_fisher_seconds']:.1f} | "
                         f"{r['bf16_fisher_seconds']:.1f} |")
    order = [r for r in runs if r["part"] == "order"]
    if order:
        lines += ["", "| model (task) | Fisher samples x batch | tokens | padded tokens, draw order → longest first | "
                  "Fisher s, draw order → longest first | speed-up | same mask entries |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in order:
            pad, sec = r["padded_tokens"], r["median_seconds"]
            lines.append(f"| {r['model']} ({r['task']}) | {r['samples']} x {r['batch_size']} | {r['tokens']:,} | "
                         f"{pad['draw_order']:,} → {pad['longest_first']:,} | {sec['draw_order']:.1f} → "
                         f"{sec['longest_first']:.1f} | {r['speedup']:.2f}x | {100 * r['same_mask_entries']:.2f}% |")
    cli = [r for r in runs if r["part"] == "cli"]
    if cli:
        lines += ["", "| CLI run (train --method fish) | train batch x length | Fisher batch plan | mask phase peak RSS "
                  "(MB) | training peak RSS (MB) | mask / train |", "| --- | --- | --- | --- | --- | --- |"]
        for r in cli:
            plan = r["mask_phase"].get("fisher_batch_plan") or {}
            lines.append(f"| {r['model']} ({r['task']}) | {r['train_batch']} x {r['max_seq_length']} | "
                         f"{plan.get('batch_size')} x {plan.get('groups')} group(s) | {r['mask_peak_rss_mb']:,.0f} | "
                         f"{r['train_peak_rss_mb']:,.0f} | {r['mask_peak_rss_mb'] / r['train_peak_rss_mb']:.2f} |")
    table = "\n".join(lines)
    write_json(target, {"selection": selection, "models": models, "lora_fish_step": step_runs,
                        "precision": precision, "order": order, "cli": cli, "table": table,
                        **provenance()})
    print(table)


PRECISION_RUNS = {  # model, task, data folder under ../shared/data, sequence length
    "minilm": ("minilm", "sst2", "glue", 64),
    "smollm2": ("smollm2-135m", "social_iqa", "bigbench", 256),
}


def _runs_to_do(out: Path, part: str, models: str) -> list[tuple[str, Path]]:
    """(model key, result file) of each --models entry whose file does not exist yet: a part resumes."""
    return [(key, out / f"{part}_{key}.json") for key in models.split(",") if not (out / f"{part}_{key}.json").exists()]


def _real_model_and_data(run: tuple, data_root: Path):
    """A packaged model, its task's training features and the CLI's collator for them: (model, train, collate)."""
    from sparsepeft.cli.train import _collator
    from sparsepeft.experiments.pipeline import featurize, load_model_and_tokenizer, load_task_data

    name, task_name, folder, max_length = run
    task = load_task_data(task_name, str(data_root / folder))
    model, tokenizer = load_model_and_tokenizer(name, task)
    train, _ = featurize(task, tokenizer, max_length, None, 1, 0)
    return model, train, _collator(task, tokenizer, model)


def run_precision(out: Path, models: str, samples: int, batch_size: int, data_root: Path) -> None:
    from sparsepeft import estimate_fisher, select_mask

    for key, path in _runs_to_do(out, "precision", models):
        name, task_name, _, max_length = PRECISION_RUNS[key]
        model, train, collate = _real_model_and_data(PRECISION_RUNS[key], data_root)
        result = {"part": "precision", "model": name, "task": task_name, "samples": samples, "max_length": max_length}
        masks = {}
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            start = time.perf_counter()
            fisher = estimate_fisher(model, train, num_samples=samples, batch_size=batch_size, collate_fn=collate,
                                     progress=False, autocast_dtype=dtype)
            result[f"{label}_fisher_seconds"] = time.perf_counter() - start
            masks[label] = select_mask(fisher, 0.005, model=model)
            del fisher
        a, b = masks["fp32"], masks["bf16"]
        common = sum(int(torch.isin(a.indices[n], b.indices[n]).sum()) for n in a.indices if n in b.indices)
        ranked = a.num_selected - sum(a.kept(n) for n in a.shapes if a.kept(n) and a.is_full(n))
        heads = a.num_selected - ranked  # entries of tensors kept whole: the head, or small norm vectors
        result.update(selected=a.num_selected, always_trained=heads, common=common,
                      overlap=common / a.num_selected, overlap_ranked=(common - heads) / max(1, ranked))
        write_json(path, {**result, **provenance()})
        print(json.dumps(result))


ORDER_RUNS = {  # model, task, data folder, sequence length
    "suite": ("smollm2-135m", "social_iqa,winowhy,timedial,epistemic_reasoning", "bigbench", 256),
    "minilm": ("minilm", "sst2", "glue", 64),
}


def _padded_tokens(lengths: list[int], batch_size: int) -> int:
    """Tokens a pass computes when each batch pads to its longest sample."""
    return sum(max(lengths[k:k + batch_size]) * len(lengths[k:k + batch_size]) for k in range(0, len(lengths), batch_size))


def run_order(out: Path, models: str, samples: int, batch_size: int, data_root: Path, repeats: int) -> None:
    """The same draw of Fisher samples batched in draw order (as before) and longest first (as now): time of each
    pass (interleaved, median of ``repeats``), tokens computed with padding, the largest difference between the
    two Fishers and the overlap of the 0.5% masks they select."""
    from torch.utils.data import DataLoader, Subset

    from sparsepeft import estimate_fisher, select_mask
    from sparsepeft.importance.fisher import _longest_first

    for key, path in _runs_to_do(out, "order", models):
        name, task_name, _, max_length = ORDER_RUNS[key]
        model, train, collate = _real_model_and_data(ORDER_RUNS[key], data_root)
        draw = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:samples].tolist()
        orders = {"draw_order": draw, "longest_first": _longest_first(train, draw)}
        lengths = {label: [len(train[i]["input_ids"]) for i in idx] for label, idx in orders.items()}
        seconds: dict[str, list[float]] = {label: [] for label in orders}
        fishers = {}
        for _ in range(repeats):
            for label, idx in orders.items():
                batches = DataLoader(Subset(train, idx), batch_size=batch_size, shuffle=False, collate_fn=collate)
                start = time.perf_counter()
                fishers[label] = estimate_fisher(model, batches, num_samples=samples, batch_size=batch_size,
                                                 progress=False)
                seconds[label].append(time.perf_counter() - start)
        a, b = fishers["longest_first"], fishers["draw_order"]
        largest = max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in b)
        masks = {label: select_mask(f, 0.005, model=model) for label, f in fishers.items()}
        x, y = masks["longest_first"], masks["draw_order"]
        common = sum(int(torch.isin(x.indices[n], y.indices[n]).sum()) for n in x.indices if n in y.indices)
        result = {"part": "order", "model": name, "task": task_name, "samples": samples, "batch_size": batch_size,
                  "max_length": max_length, "repeats": repeats, "seconds": seconds,
                  "median_seconds": {label: statistics.median(v) for label, v in seconds.items()},
                  "tokens": sum(lengths["draw_order"]),
                  "padded_tokens": {label: _padded_tokens(v, batch_size) for label, v in lengths.items()},
                  "largest_relative_difference": largest, "mask_entries": y.num_selected,
                  "same_mask_entries": common / y.num_selected}
        result["speedup"] = result["median_seconds"]["draw_order"] / result["median_seconds"]["longest_first"]
        write_json(path, {**result, **provenance()})
        print(json.dumps({k: result[k] for k in ("model", "median_seconds", "padded_tokens", "speedup",
                                                 "same_mask_entries")}))


CLI_RUNS = {  # model, task, data folder, training batch, sequence length
    "smollm2": ("smollm2-135m", "social_iqa", "bigbench", 8, 256),
    "minilm": ("minilm", "sst2", "glue", 32, 64),
}


def run_cli(out: Path, models: str, samples: int, data_root: Path) -> None:
    for key, path in _runs_to_do(out, "cli", models):
        name, task, folder, batch, length = CLI_RUNS[key]
        run_dir = out / f"cli_{key}_run"
        command = [sys.executable, "-m", "sparsepeft", "train", "--model", name, "--task", task, "--data-dir",
                   str(data_root / folder), "--method", "fish", "--num-samples", str(samples), "--max-steps", "4",
                   "--per-device-train-batch-size", str(batch), "--max-seq-length", str(length),
                   "--max-train-samples", "512", "--max-eval-samples", "8", "--save-strategy", "no",
                   "--report-to", "none", "--use-cpu", "true", "--output-dir", str(run_dir),
                   "--overwrite-output-dir", "true", "--disable-tqdm", "true"]
        subprocess.run(command, check=True, env=_worker_env())
        results = json.loads((run_dir / "results.json").read_text())
        phase = results["mask_phase"]
        record = {"part": "cli", "model": name, "task": task, "train_batch": batch, "max_seq_length": length,
                  "fisher_samples": samples, "mask_phase": phase, "mask_peak_rss_mb": results["mask_peak_rss_mb"],
                  "train_peak_rss_mb": results["train_peak_rss_mb"], "fisher_seconds": results.get("fisher_seconds"),
                  "mask_seconds": results.get("mask_seconds"), "step_seconds": results["train_seconds"] / 4,
                  "cli_command": command[1:]}
        shutil.rmtree(run_dir)
        write_json(path, {**record, **provenance()})
        print(json.dumps({k: record[k] for k in ("model", "mask_peak_rss_mb", "train_peak_rss_mb")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["selection", "model", "one", "precision", "order", "cli", "lora-fish-step",
                                           "summary"],
                        required=True)
    parser.add_argument("--models", default="minilm,smollm2", help="precision: which real models")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="docs/results/scale_cpu")
    parser.add_argument("--summary", default=None, help="summary file (default: OUT.json)")
    parser.add_argument("--sizes", default="134m,374m,1.1b")
    parser.add_argument("--arms", default="mask,fish,fish-random,lora,full")
    parser.add_argument("--size")
    parser.add_argument("--arm")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every phase (as training with --bf16)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fisher-samples", type=int, default=16)
    parser.add_argument("--keep-ratio", type=float, default=0.005)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-up-to", type=int, default=200_000_000)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("SCALE_THREADS", torch.get_num_threads())))
    if args.part == "selection":
        run_selection(out, args.repeats, args.baseline_up_to, args.device)
    elif args.part == "model":
        run_models(out, args)
    elif args.part == "precision":
        run_precision(out, args.models, args.fisher_samples, args.batch_size, Path(args.data_root))
    elif args.part == "order":
        run_order(out, args.models, args.fisher_samples, args.batch_size, Path(args.data_root), args.repeats)
    elif args.part == "cli":
        run_cli(out, args.models, args.fisher_samples, Path(args.data_root))
    elif args.part == "lora-fish-step":
        run_lora_fish_step(out, args)
    elif args.part == "one":
        path = out / f"model_{args.size}_{args.arm}.json"
        write_json(path, {**run_arm(args.size, args.arm, out, args), **provenance()})
    else:
        summarize(out, Path(args.summary or f"{out}.json"))


if __name__ == "__main__":
    main()
