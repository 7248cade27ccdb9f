"""Step time and memory of IST (each optimizer-state policy) against vanilla LoRA, side by side.

    python benchmarks/layerwise_speed_memory.py --model minilm --out docs/results/layerwise_minilm_cpu.json
    python benchmarks/layerwise_speed_memory.py --model llama100m --batch-size 2 --seq-len 512 --steps 4 \
        --repeats 3 --out docs/results/layerwise_llama100m_cpu.json

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
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, random_token_data, write_json  # noqa: E402

ARMS = ("lora", "ist-keep", "ist-offload", "ist-drop")


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

    def __init__(self, name: str, model, data):
        from sparsepeft import LayerwiseConfig, LayerwiseEngine
        from sparsepeft.data.collate import PaddingCollator

        self.name, self.model, self.data = name, model, data
        model.train()  # as Trainer does: dropout on, in every arm
        self.collate = PaddingCollator(0)
        self.engine = None
        if name.startswith("ist"):
            config = LayerwiseConfig("ist", optimizer_state=name.split("-")[1])
            self.engine = LayerwiseEngine(model, config, data, self.collate).attach()
            params = self.engine.trainable_parameters()
        else:
            params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        self.lowest: list[int] = []
        self.step = 0

    def train_step(self, batch_size: int) -> None:
        if self.engine is not None:
            self.lowest.append(min(self.engine.step_begin(self.optimizer)))
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


def memory_worker(model_name: str, arm: str, batch_size: int, seq_len: int, steps: int, queue) -> None:
    from sparsepeft.engines.layerwise import resident_state_bytes

    torch.set_num_threads(torch.get_num_threads())
    model, _ = build_model(model_name)
    data = make_data(model_name, model, max(4 * batch_size, 16), seq_len)
    runner = Arm(arm, model, data)
    loaded = _rss_mb()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved, but not activations
    saved_per_step: list[int] = []
    for _ in range(steps):
        seen: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            runner.train_step(batch_size)
        saved_per_step.append(sum(seen.values()))
    peak = _rss_mb("VmHWM")
    queue.put({
        "peak_rss_mb": peak, "loaded_rss_mb": loaded, "train_overhead_mb": peak - loaded,
        "saved_activation_mb_median": statistics.median(saved_per_step) / 2**20,
        "saved_activation_mb_max": max(saved_per_step) / 2**20,
        "optimizer_state_on_device_mb": resident_state_bytes(runner.optimizer) / 2**20,
        "lowest_selected_block": runner.lowest,
    })


def measure_memory(args, arm: str) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=memory_worker, args=(args.model, arm, args.batch_size, args.seq_len,
                                                          args.steps * args.repeats, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def measure_time(args) -> tuple[dict, dict]:
    base, total = build_model(args.model)
    data = make_data(args.model, base, max(4 * args.batch_size, 16), args.seq_len)
    arms = {name: Arm(name, copy.deepcopy(base) if i else base, data) for i, name in enumerate(ARMS)}
    for runner in arms.values():  # warm-up: allocator, optimizer state
        runner.train_step(args.batch_size)
    times: dict[str, list[float]] = {name: [] for name in ARMS}
    for _ in range(args.repeats):
        for name, runner in arms.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                runner.train_step(args.batch_size)
                times[name].append(time.perf_counter() - start)
    lowest = {name: runner.lowest for name, runner in arms.items() if runner.engine is not None}
    return times, {"total_params": total, "lowest_selected_block": lowest,
                   "num_blocks": len(arms["ist-keep"].engine.block_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", choices=["minilm", "llama100m"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per arm per round")
    parser.add_argument("--repeats", type=int, default=4, help="rounds")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default="docs/results/layerwise_minilm_cpu.json")
    args = parser.parse_args()

    times, info = measure_time(args)
    step = {name: median(values) for name, values in times.items()}
    report = {"machine": machine(), "args": vars(args), **info,
              "step_seconds_median": step,
              "step_time_ratio_vs_lora": {name: step[name] / step["lora"] for name in ARMS}}
    print(f"{args.model}: {info['total_params'] / 1e6:.1f}M parameters, {info['num_blocks']} blocks")
    for name in ARMS:
        print(f"  {name:12s} step {step[name]:.3f}s  ({step[name] / step['lora']:.2f}x LoRA)", flush=True)
    if not args.skip_memory:
        memory = {name: measure_memory(args, name) for name in ARMS}
        report["memory"] = memory
        lora = memory["lora"]
        report["memory_ratio_vs_lora"] = {
            name: {key: memory[name][key] / lora[key] if lora[key] else None
                   for key in ("peak_rss_mb", "train_overhead_mb", "saved_activation_mb_median",
                               "saved_activation_mb_max", "optimizer_state_on_device_mb")}
            for name in ARMS}
        for name in ARMS:
            m = memory[name]
            print(f"  {name:12s} peak RSS {m['peak_rss_mb']:.0f} MB (overhead {m['train_overhead_mb']:.0f}), saved "
                  f"activations median {m['saved_activation_mb_median']:.0f} / max {m['saved_activation_mb_max']:.0f} MB, "
                  f"optimizer state on device {m['optimizer_state_on_device_mb']:.2f} MB", flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
