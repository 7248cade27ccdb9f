"""Code that runs inside each process of the 2-process gloo tests (imported by the spawned workers)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from conftest import make_examples, make_model, no_dropout


def init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def fisher_worker(rank: int, world: int, init_file: str, out: str) -> None:
    init(rank, world, init_file)
    from sparsepeft import estimate_fisher

    model = make_model("bert").double()
    scored = []  # every sample this rank's forward passes saw, as its unpadded token ids

    def record(module, args, kwargs):
        for ids, keep in zip(kwargs["input_ids"], kwargs["attention_mask"]):
            scored.append(ids[keep.bool()].tolist())

    model.register_forward_pre_hook(record, with_kwargs=True)
    fisher = estimate_fisher(model, make_examples(30), num_samples=23, batch_size=4, progress=False)
    torch.save(scored, f"{out}.samples.rank{rank}")
    if rank == 0:
        torch.save(fisher, out)
    dist.destroy_process_group()


def train(model, mask, engine_name: str, batches, steps: int, ddp: bool):
    """A few AdamW steps (weight decay, clipping) with the engine, under DDP when asked."""
    from sparsepeft import DenseMaskEngine, SparseDeltaEngine

    engine = (SparseDeltaEngine(model, mask) if engine_name == "sparse" else DenseMaskEngine(model, mask)).attach()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = torch.optim.AdamW(list(engine.trainable_parameters()), lr=1e-2, weight_decay=0.1)
    engine.attach_optimizer(optimizer)
    wrapped.train()
    for step in range(steps):
        loss = wrapped(**batches[step % len(batches)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    engine.detach()
    return model


def ddp_worker(rank: int, world: int, init_file: str, out: str, engine_name: str) -> None:
    init(rank, world, init_file)
    from sparsepeft.data.collate import PaddingCollator
    from conftest import random_score_mask

    model = no_dropout(make_model("bert"))
    mask = random_score_mask(model, 0.1)
    examples = make_examples(16, lengths=(8, 9))  # equal lengths: the halves pad like the whole batch
    shard = [examples[i] for i in range(rank, len(examples), world)]
    batches = [PaddingCollator(0)(shard[i : i + 4]) for i in range(0, len(shard), 4)]
    train(model, mask, engine_name, batches, steps=4, ddp=True)
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{out}.rank{rank}")
    dist.destroy_process_group()


def mismatch_worker(rank: int, world: int, init_file: str, what: str) -> None:
    init(rank, world, init_file)
    from conftest import random_score_mask
    from sparsepeft import DenseMaskEngine, estimate_fisher

    try:
        if what == "mask":
            model = make_model("bert")
            DenseMaskEngine(model, random_score_mask(model, 0.1, seed=rank)).attach()
        else:
            estimate_fisher(make_model("bert", seed=rank), make_examples(8), num_samples=8, progress=False)
    finally:
        dist.destroy_process_group()


def layerwise_model():
    from sparsepeft import apply_method

    model = no_dropout(make_model("bert", layers=4))
    model = apply_method(model, "lora", {"r": 2, "target_modules": ["query", "value"], "lora_dropout": 0.0})
    torch.manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model


def layerwise_train(model, batches, probe_data, steps: int, ddp: bool):
    """IST in a plain loop (under DDP when asked); returns the selections and which blocks got gradients."""
    from sparsepeft import LayerwiseConfig, LayerwiseEngine
    from sparsepeft.data.collate import PaddingCollator

    engine = LayerwiseEngine(model, LayerwiseConfig("ist", fraction=0.5, probe_interval=2, probe_batch_size=8),
                             probe_data, PaddingCollator(0)).attach()
    wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ddp else model
    optimizer = torch.optim.AdamW(engine.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    graded = []
    for step in range(steps):
        engine.step_begin(optimizer)
        wrapped(**batches[step % len(batches)]).loss.backward()
        graded.append(sorted({int(n.split(".layer.")[1].split(".")[0]) for n, p in model.named_parameters()
                              if p.grad is not None and ".layer." in n}))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    engine.detach()
    return {"selections": engine.selections, "graded": graded, "scores": engine.sampler.scores.tolist(),
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def layerwise_worker(rank: int, world: int, init_file: str, out: str) -> None:
    init(rank, world, init_file)
    from sparsepeft.data.collate import PaddingCollator

    examples = make_examples(16, lengths=(8, 9))
    shard = [examples[i] for i in range(rank, len(examples), world)]
    batches = [PaddingCollator(0)(shard[i : i + 4]) for i in range(0, len(shard), 4)]
    result = layerwise_train(layerwise_model(), batches, examples, steps=6, ddp=True)
    torch.save(result, f"{out}.rank{rank}")
    dist.destroy_process_group()


def length_grouped_worker(rank: int, world: int, port: int, out: str, shuffle: bool) -> None:
    """Three epochs of SparseTrainer with length grouping under DDP (Trainer sets the process group up from the
    environment, as under torchrun); records the examples this rank trained in each epoch."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from transformers import TrainerCallback, TrainingArguments

    from sparsepeft import SparseTrainer
    from sparsepeft.data.collate import PaddingCollator

    seen: dict[int, list[tuple[int, ...]]] = {}
    epoch = [0]

    def collate(features):
        seen.setdefault(epoch[0], []).extend(tuple(f["input_ids"]) for f in features)
        return PaddingCollator(0)(features)

    class EpochOf(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            epoch[0] = round(state.epoch or 0)

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, num_train_epochs=3, learning_rate=1e-3,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                             dataloader_pin_memory=False, ddp_backend="gloo", train_sampling_strategy="group_by_length")
    # dropout stays on: it moves each process's global generator by its own batches' sizes
    trainer = SparseTrainer(model=make_model("bert"), args=args, train_dataset=make_examples(64, lengths=(3, 30), seed=2),
                            data_collator=collate, callbacks=[EpochOf()], shuffle_length_groups=shuffle)
    trainer.train()
    torch.save(seen, f"{out}/seen.rank{rank}")
