"""Step time and memory of IST (each optimizer-state policy) against vanilla LoRA, side by side, over seeds.

    python benchmarks/layerwise_speed_memory.py --model minilm --out docs/results/layerwise_minilm_cpu.json
    python benchmarks/layerwise_speed_memory.py --model llama100m --batch-size 2 --seq-len 512 --steps 4 \
        --repeats 3 --out docs/results/layerwise_llama100m_cpu.json
    python benchmarks/layerwise_speed_memory.py --model smollm2 --batch-size 16 --arms lora,ist-keep \
        --steps 10 --repeats 2 --seeds 0,1,2,3,4 --out docs/results/layerwise_smollm2_cpu.json

Seeds: IST's draws depend on its sampler's seed, and one seed's draws can sit far from the sampler's
average (the lowest selected block decides how far backward runs). Each seed in ``--seeds`` repeats the
whole protocol with that sampler seed; the report gives every seed's figures, their mean and spread, and
the value *expected* under the sampler's own distribution: for k of L blocks drawn uniformly (IST's
scores start equal), P(lowest block = m) = C(L-1-m, k-1) / C(L, k), applied to the measured mean saved
activations (and step time) per lowest block.

Arms: ``lora`` (every block's LoRA trains: the vanilla method) and ``ist-keep`` / ``ist-offload`` /
``ist-drop`` (IST with its published constants, the three optimizer-state policies). Every arm trains
LoRA r=8 on the attention projections (query/value; LLaMA q_proj/v_proj) on the same full-length batches
with AdamW.

Time: one process holds a copy of the model per arm; arms take turns, ``--steps`` steps each per round,
over ``--repeats`` rounds, so machine noise hits them alike. The step time includes IST's draw, its
probes (every 10 steps) and the policy's state moves. Ratios are of medians.

Memory: each arm runs alone in a fresh process (``--steps`` × ``--repeats`` steps):
- ``peak_rss_mb`` and ``train_overhead_mb`` (peak RSS minus the RSS with the model and data loaded);
- ``saved_activation_mb``: bytes autograd keeps for the backward pass, counted per step with
  saved-tensor hooks — exact, noise-free, and what a lower selected block changes;
- ``optimizer_state_on_device_mb`` at the end (offload moves it to the CPU, drop frees it).
On a CPU machine the device *is* the CPU: offloading does not lower RSS there, only on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, provenance, random_token_data, write_json  # noqa: E402

ARMS = ("lora", "ist-keep", "ist-offload", "ist-drop")
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # the LLM track's (IST's) set


def build_model(name: str):
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from sparsepeft.experiments.pipeline import resolve_model
    from sparsepeft.models.peft import apply_method

    torch.manual_seed(0)
    if name == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm"), num_labels=2)
        targets = ["query", "value"]
    elif name == "llama100m":  # LLaMA-style decoder of ~100M parameters, random init
        config = LlamaConfig(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024)
        model = LlamaForCausalLM(config)
        targets = ["q_proj", "v_proj"]
    elif name == "smollm2":  # the LLM track's pretrained model (30 blocks), with its LoRA targets
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"))
        targets = LLM_TARGETS
    else:
        raise ValueError(name)
    total = sum(p.numel() for p in model.parameters())
    model = apply_method(model, "lora", {"r": 8, "target_modules": targets, "lora_dropout": 0.0})
    return model, total


def make_data(name: str, model, n: int, seq_len: int) -> list[dict]:
    data = random_token_data(n, seq_len, model.config.vocab_size)
    if name != "minilm":  # causal LM: the tokens are the labels
        for example in data:
            example["labels"] = list(example["input_ids"])
    return data


class Arm:
    """One model copy, its optimizer and (IST) its layer-wise engine."""

    def __init__(self, name: str, model, data, seed: int = 0):
        from sparsepeft import LayerwiseConfig, LayerwiseEngine
        from sparsepeft.data.collate import PaddingCollator

        self.name, self.model, self.data = name, model, data
        model.train()  # as Trainer does: dropout on, in every arm
        self.collate = PaddingCollator(0)
        self.engine = None
        if name.startswith("ist"):
            config = LayerwiseConfig("ist", optimizer_state=name.split("-")[1], seed=seed)
            self.engine = LayerwiseEngine(model, config, data, self.collate).attach()
            params = self.engine.trainable_parameters()
        else:
            params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        self.lowest: list[int] = []
        self.step = 0

    def train_step(self, batch_size: int) -> None:
        if self.engine is not None:
            selected = self.engine.step_begin(self.optimizer)
            self.lowest.append(min(selected))
            self.chosen = len(selected)
        start = (self.step * batch_size) % (len(self.data) - batch_size + 1)
        batch = self.collate(self.data[start:start + batch_size])
        self.model(**batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1


def _rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process. ru_maxrss is not used: Linux carries
    it over from the forking parent across exec, so a fresh worker would report the parent's peak."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def memory_worker(model_name: str, arm: str, batch_size: int, seq_len: int, steps: int, seed: int, queue) -> None:
    from sparsepeft.engines.layerwise import resident_state_bytes

    torch.set_num_threads(torch.get_num_threads())
    model, _ = build_model(model_name)
    data = make_data(model_name, model, max(4 * batch_size, 16), seq_len)
    runner = Arm(arm, model, data, seed)
    loaded = _rss_mb()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved, but not activations
    saved_per_step: list[int] = []
    step_peaks: list[float] = []  # each step's own high-water mark (reset before it)
    for _ in range(steps):
        seen: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        _reset_high_water_mark()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            runner.train_step(batch_size)
        saved_per_step.append(sum(seen.values()))
        step_peaks.append(_rss_mb("VmHWM"))
    peak = max([loaded, *step_peaks])
    queue.put({
        "peak_rss_mb": peak, "loaded_rss_mb": loaded, "train_overhead_mb": peak - loaded,
        "step_peak_rss_mb": step_peaks,
        "saved_activation_mb_median": statistics.median(saved_per_step) / 2**20,
        "saved_activation_mb_mean": statistics.mean(saved_per_step) / 2**20,
        "saved_activation_mb_per_step": [b / 2**20 for b in saved_per_step],
        "saved_activation_mb_max": max(saved_per_step) / 2**20,
        "optimizer_state_on_device_mb": resident_state_bytes(runner.optimizer) / 2**20,
        "lowest_selected_block": runner.lowest,
    })


def measure_memory(args, arm: str, seed: int = 0) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=memory_worker, args=(args.model, arm, args.batch_size, args.seq_len,
                                                          args.steps * args.repeats, seed, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def measure_time(args, arms: tuple[str, ...], seed: int) -> tuple[dict, dict]:
    base, total = build_model(args.model)
    data = make_data(args.model, base, max(4 * args.batch_size, 16), args.seq_len)
    runners = {name: Arm(name, copy.deepcopy(base) if i else base, data, seed) for i, name in enumerate(arms)}
    for runner in runners.values():  # warm-up: allocator, optimizer state
        runner.train_step(args.batch_size)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                runner.train_step(args.batch_size)
                times[name].append(time.perf_counter() - start)
    ist = next(name for name in arms if name.startswith("ist"))
    lowest = {name: runner.lowest[1:] for name, runner in runners.items() if runner.engine is not None}  # timed steps
    return times, {"total_params": total, "lowest_selected_block": lowest,
                   "num_blocks": len(runners[ist].engine.block_ids), "blocks_per_step": runners[ist].chosen}


def lowest_block_distribution(num_blocks: int, chosen: int) -> dict[int, float]:
    """P(lowest selected block = m) when ``chosen`` of ``num_blocks`` blocks are drawn uniformly."""
    from math import comb

    return {m: comb(num_blocks - 1 - m, chosen - 1) / comb(num_blocks, chosen)
            for m in range(num_blocks - chosen + 1)}


def expected_under_sampler(lowest: list[int], values: list[float], num_blocks: int, chosen: int) -> float | None:
    """Sum over m of P(lowest = m) x the mean measured value at lowest block m (linear fit where m was not seen)."""
    if not lowest:
        return None
    by_block: dict[int, list[float]] = {}
    for m, v in zip(lowest, values):
        by_block.setdefault(m, []).append(v)
    means = {m: statistics.mean(v) for m, v in by_block.items()}
    if len(means) >= 2:
        xs, ys = list(means), list(means.values())
        slope, intercept = statistics.linear_regression(xs, ys)
    else:
        slope, intercept = 0.0, next(iter(means.values()))
    return sum(p * means.get(m, intercept + slope * m) for m, p in lowest_block_distribution(num_blocks, chosen).items())


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", choices=["minilm", "llama100m", "smollm2"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per arm per round")
    parser.add_argument("--repeats", type=int, default=2, help="rounds")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="IST sampler seeds; the protocol runs once per seed")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default="docs/results/layerwise_minilm_cpu.json")
    args = parser.parse_args()
    arms = tuple(args.arms.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    report = {"provenance": provenance(), "args": vars(args), "seeds": {}}
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else None
    same = ("model", "batch_size", "seq_len", "steps", "repeats", "arms", "skip_memory")
    if previous and all(previous.get("args", {}).get(k) == vars(args)[k] for k in same):
        report["seeds"] = {int(k): v for k, v in previous["seeds"].items()}  # resume: seeds already measured
        report["resumed_from"] = previous["provenance"]
        for key in ("total_params", "num_blocks", "blocks_per_step"):
            report[key] = previous.get(key)
    for seed in seeds:
        if seed in report["seeds"]:
            continue
        times, info = measure_time(args, arms, seed)
        per_seed = {"step_seconds_median": {n: median(v) for n, v in times.items()},
                    "step_seconds_mean": {n: statistics.mean(v) for n, v in times.items()},  # probe steps weigh in
                    "step_seconds": times, **info}
        per_seed["step_time_ratio_vs_lora"] = {n: per_seed["step_seconds_mean"][n] / per_seed["step_seconds_mean"]["lora"]
                                               for n in arms}
        if not args.skip_memory:
            per_seed["memory"] = {n: measure_memory(args, n, seed) for n in arms if n != "lora" or seed == seeds[0]}
        report["seeds"][seed] = per_seed
        report.update(total_params=info["total_params"], num_blocks=info["num_blocks"],
                      blocks_per_step=info["blocks_per_step"])
        write_json(args.out, report)  # a partial report survives an interruption
        print(f"seed {seed}: step time / LoRA (means, probes included) "
              f"{ {n: round(r, 3) for n, r in per_seed['step_time_ratio_vs_lora'].items()} }", flush=True)
    report["summary"] = summarise(report, arms, seeds)
    write_json(args.out, report)
    print(json.dumps(report["summary"], indent=2))


def summarise(report: dict, arms: tuple[str, ...], seeds: list[int]) -> dict:
    num_blocks, chosen = report["num_blocks"], report["blocks_per_step"]
    first = report["seeds"][seeds[0]]
    summary = {"num_blocks": num_blocks, "blocks_per_step": chosen,
               "expected_lowest_block_uniform": sum(m * p for m, p in lowest_block_distribution(num_blocks, chosen).items())}
    for arm in arms:
        if arm == "lora":
            continue
        ratios = [report["seeds"][s]["step_time_ratio_vs_lora"][arm] for s in seeds]
        lowest = [statistics.mean(report["seeds"][s]["lowest_selected_block"][arm]) for s in seeds]
        entry = {"step_time_ratio_vs_lora_mean_over_steps": _spread(ratios), "mean_lowest_block": _spread(lowest)}
        if "memory" in first:
            lora = first["memory"]["lora"]
            mems = [report["seeds"][s]["memory"][arm] for s in seeds]
            entry["saved_activations_ratio_mean_over_steps"] = _spread(
                [m["saved_activation_mb_mean"] / lora["saved_activation_mb_mean"] for m in mems])
            entry["peak_rss_ratio"] = _spread([m["peak_rss_mb"] / lora["peak_rss_mb"] for m in mems])
            entry["peak_rss_ratio_max_over_seeds"] = max(m["peak_rss_mb"] for m in mems) / lora["peak_rss_mb"]
            lora_steps = lora.get("step_peak_rss_mb")
            if lora_steps:  # the distribution of per-step peaks against LoRA's median step peak
                base = statistics.median(lora_steps)
                per_step = [p / base for m in mems for p in m["step_peak_rss_mb"]]
                entry["step_peak_rss_ratio_vs_lora_median_step"] = {
                    **_spread(per_step), "median": statistics.median(per_step),
                    "share_of_steps_at_or_below_lora_max": sum(p <= max(lora_steps) / base for p in per_step) / len(per_step)}
            pooled_lowest = [b for m in mems for b in m["lowest_selected_block"]]
            pooled_saved = [v / lora["saved_activation_mb_mean"] for m in mems for v in m["saved_activation_mb_per_step"]]
            entry["saved_activations_ratio_expected_uniform"] = expected_under_sampler(
                pooled_lowest, pooled_saved, num_blocks, chosen)
        steps_lowest = [b for s in seeds for b in report["seeds"][s]["lowest_selected_block"][arm]]
        steps_ratio = [t / report["seeds"][s]["step_seconds_median"]["lora"]
                       for s in seeds for t in report["seeds"][s]["step_seconds"][arm]]
        entry["step_time_ratio_expected_uniform"] = expected_under_sampler(steps_lowest, steps_ratio, num_blocks, chosen)
        summary[arm] = entry
    return summary


if __name__ == "__main__":
    main()
