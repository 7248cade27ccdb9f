"""The few collective operations sparsepeft needs, on whatever ``torch.distributed`` group is running.

Launch with ``torchrun`` or ``accelerate launch`` as usual; nothing here starts processes or groups.
Every rank must end with the same Fisher and the same mask — a silent disagreement would train
different entries on different ranks — so results are compared across ranks and a mismatch is an error.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch
import torch.distributed as dist


class RankMismatchError(RuntimeError):
    """Ranks disagree on something that must be identical everywhere (Fisher, mask, layer choice)."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _collective_device(reference: torch.Tensor | None = None) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return reference.device if reference is not None and reference.device.type == "cpu" else torch.device("cpu")


def all_reduce_sum_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one flat buffer per dtype and device: few messages)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for (_, device), members in sorted(groups.items(), key=lambda item: str(item[0])):
        flat = torch.cat([t.reshape(-1) for t in members]).to(_collective_device(members[0]))
        dist.all_reduce(flat)
        flat = flat.to(device)
        start = 0
        for tensor in members:
            tensor.copy_(flat[start : start + tensor.numel()].view_as(tensor))
            start += tensor.numel()


def broadcast_from_rank_zero(value: float) -> float:
    """Rank 0's ``value`` on every rank (unchanged when not distributed)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def union_of_names(names: Sequence[str], universe: Sequence[str]) -> list[str]:
    """The names that any rank listed (in ``universe`` order), identical on every rank."""
    flags = torch.tensor([1.0 if n in set(names) else 0.0 for n in universe], dtype=torch.float64)
    all_reduce_sum_([flags])
    return [n for n, f in zip(universe, flags.tolist()) if f > 0]


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes: equal only for bit-identical contents."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def assert_same_on_all_ranks(value: str, what: str) -> None:
    """Raise :class:`RankMismatchError` if ``value`` (a digest) differs between ranks."""
    if not is_distributed():
        return
    values: list = [None] * world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        groups: dict[str, list[int]] = {}
        for r, v in enumerate(values):
            groups.setdefault(v, []).append(r)
        raise RankMismatchError(
            f"The ranks disagree on {what}: ranks {list(groups.values())} hold different values. Every rank must "
            "use the same model weights, data, seed and sparsepeft settings; check that the launch gives them all "
            "the same arguments.")


class ShardedTrainingNotSupported(RuntimeError):
    """FSDP / DeepSpeed shard parameters across ranks; masks address whole parameters."""


_SHARDED_MESSAGE = (
    "{what} is not supported by sparsepeft's mask engines: they address entries of whole parameters, which "
    "FSDP and DeepSpeed shard across ranks (and FSDP needs uniform requires_grad per unit, which masks break). "
    "Launch with plain DDP instead — `torchrun --nproc_per_node N` or `accelerate launch` without an FSDP/"
    "DeepSpeed config — which is supported for both engines (README, 'Scaling out').")


def refuse_sharded_model(model) -> None:
    """Raise if ``model`` is (or holds) FSDP-wrapped modules, DTensor shards or DeepSpeed ZeRO-3 params."""
    for module in model.modules():
        name = type(module).__name__
        if name in ("FullyShardedDataParallel", "FSDPModule") or hasattr(module, "_fsdp_wrapped_module") \
                or name.startswith("FSDP"):
            raise ShardedTrainingNotSupported(_SHARDED_MESSAGE.format(what="FSDP"))
    for param in model.parameters():
        if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
            raise ShardedTrainingNotSupported(_SHARDED_MESSAGE.format(what="FSDP2 / DTensor-sharded parameters"))
        if hasattr(param, "ds_id"):
            raise ShardedTrainingNotSupported(_SHARDED_MESSAGE.format(what="DeepSpeed ZeRO-3"))


def refuse_sharded_args(args) -> None:
    """Raise if transformers ``TrainingArguments`` ask for FSDP or DeepSpeed."""
    import os

    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ShardedTrainingNotSupported(_SHARDED_MESSAGE.format(what="FSDP"))
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ShardedTrainingNotSupported(_SHARDED_MESSAGE.format(what="DeepSpeed"))
