"""Sparse-delta checkpoints: the trained entries of a masked model, and nothing else.

A delta file holds, per partly-trained tensor, the flat indices of its trained entries and their
values after training; tensors trained in full (the task head) are stored whole. Its header carries
the model fingerprint (names and shapes) and a content hash of the *base* weights the delta applies to,
so ``apply_delta`` on any other base — another architecture, or the same architecture with other
weights — is refused instead of silently producing a different model.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

import torch
from torch import nn

from ..selection.mask import SparseMask, model_fingerprint
from ..utils.io import load_tensors_with_header, save_tensors_with_header

DELTA_FORMAT_VERSION = 1
DELTA_HEADER_KEY = "sparsepeft_delta"
_INDEX, _VALUES, _DENSE = "::indices", "::values", "::dense"


class DeltaMismatchError(ValueError):
    """The delta was made from another base model."""


def base_content_hash(model: nn.Module, skip: Iterable[str] = ()) -> str:
    """SHA-256 over the bytes of every parameter except ``skip`` (tensors the delta replaces whole).

    Skipping whole-trained tensors matters: a freshly initialised task head differs on every load, and
    the delta overwrites it anyway.
    """
    skip = set(skip)
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name in skip:
            continue
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fully_trained(mask: SparseMask) -> list[str]:
    return [n for n in mask.shapes if mask.kept(n) and mask.is_full(n)]


def save_delta(model: nn.Module, mask: SparseMask, path: str | os.PathLike, base_hash: str,
               fingerprint: str | None = None) -> int:
    """Write the mask's entries of ``model`` to ``path`` (atomic); returns the file size in bytes.

    ``fingerprint`` is that of the plain base model (default: ``model``'s own, right for a model with no
    engine attached)."""
    params = dict(model.named_parameters())
    tensors = {}
    for name, index in mask.indices.items():
        value = params[name].detach().cpu()
        if mask.is_full(name):
            tensors[name + _DENSE] = value.contiguous()
        elif index.numel():
            small = value.numel() < 2**31
            tensors[name + _INDEX] = index.to(torch.int32 if small else torch.int64).contiguous()
            tensors[name + _VALUES] = value.reshape(-1)[index].contiguous()
    header = {
        "format_version": DELTA_FORMAT_VERSION,
        "fingerprint": fingerprint or model_fingerprint(model),
        "base_hash": base_hash,
        "architecture": type(model).__name__,  # which Auto class rebuilds the model (merge)
        "shapes": {n: list(s) for n, s in mask.shapes.items()},
        "mask_config": mask.config,
        "num_selected": mask.num_selected,
    }
    save_tensors_with_header(path, tensors, DELTA_HEADER_KEY, header)
    return os.path.getsize(path)


def read_delta(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    return load_tensors_with_header(path, DELTA_HEADER_KEY, "delta", DELTA_FORMAT_VERSION)


def check_delta_base(model: nn.Module, header: dict, tensors: dict, path, verify_base: bool = True) -> None:
    """Refuse a base model the delta was not trained from (other names/shapes, or other weights)."""
    if header["fingerprint"] != model_fingerprint(model):
        raise DeltaMismatchError(
            f"{path} was trained from a model with other parameter names or shapes "
            f"({header.get('mask_config', {}).get('model', 'unknown')}); load that base model first."
        )
    whole = dense_tensor_names(tensors)
    if verify_base and header.get("base_hash") and base_content_hash(model, skip=whole) != header["base_hash"]:
        raise DeltaMismatchError(
            f"{path} was trained from a base model whose weights differ from this one's (same architecture, "
            "other checkpoint). Load the exact base checkpoint the delta was made from."
        )


def dense_tensor_names(tensors: dict) -> list[str]:
    """Tensors the delta stores whole (trained in full)."""
    return [key[: -len(_DENSE)] for key in tensors if key.endswith(_DENSE)]


def sparse_entries(tensors: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per partly-trained tensor: (flat indices as int64, trained values)."""
    return {key[: -len(_INDEX)]: (value.to(torch.int64), tensors[key[: -len(_INDEX)] + _VALUES])
            for key, value in tensors.items() if key.endswith(_INDEX)}


@torch.no_grad()
def apply_delta(model: nn.Module, path: str | os.PathLike, verify_base: bool = True) -> nn.Module:
    """Turn ``model`` (the base the delta was trained from) into the fine-tuned model, exactly."""
    header, tensors = read_delta(path)
    check_delta_base(model, header, tensors, path, verify_base)
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if key.endswith(_DENSE):
            params[key[: -len(_DENSE)]].copy_(value)
        elif key.endswith(_INDEX):
            name = key[: -len(_INDEX)]
            if name + _VALUES not in tensors:
                raise ValueError(f"{path} is corrupt: {name} has indices but no values.")
            target = params[name]
            index = value.to(torch.int64).to(target.device)
            if index.numel() and int(index.max()) >= target.numel():
                raise ValueError(f"{path} is corrupt: indices of {name} exceed its {target.numel()} entries.")
            target.view(-1)[index] = tensors[name + _VALUES].to(target.device, target.dtype)
    return model
