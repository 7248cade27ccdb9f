"""Sparse-delta checkpoints: the trained entries of a masked model, and nothing else.

A delta file holds, per partly-trained tensor, the flat indices of its trained entries and their
values after training; tensors trained in full (the task head) are stored whole. Its header carries
the model fingerprint (names and shapes) and a content hash of the *frozen* entries — every base weight
the delta does not overwrite — so ``apply_delta`` on any other base (another architecture, or the same
architecture with other weights) is refused instead of silently producing a different model.

Hashing only the frozen entries is what lets the hash be taken when a delta is written rather than when
an engine is attached: training never moves a frozen entry, so the trained model's frozen entries are the
base's. Attaching therefore reads no weight, and a run that never saves a delta never hashes at all.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Mapping

import torch
from torch import nn

from ..selection.mask import SparseMask, model_fingerprint
from ..utils.io import load_tensors_with_header, save_tensors_with_header

DELTA_FORMAT_VERSION = 1
DELTA_HEADER_KEY = "sparsepeft_delta"
_INDEX, _VALUES, _DENSE = "::indices", "::values", "::dense"


FROZEN_HASH = "frozen-entries"  # header["base_hash_scope"] of deltas whose hash skips the trained entries


class DeltaMismatchError(ValueError):
    """The delta was made from another base model."""


def _hash_tensor(digest, name: str, value: torch.Tensor) -> None:
    digest.update(name.encode())
    digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy())


def base_content_hash(model: nn.Module, skip: Iterable[str] = ()) -> str:
    """SHA-256 over the bytes of every parameter except ``skip`` (tensors the delta replaces whole).

    The hash of deltas written before ``base_hash_scope`` existed; still used to check those."""
    skip = set(skip)
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if name not in skip:
            _hash_tensor(digest, name, param)
    return digest.hexdigest()


def frozen_content_hash(params: Iterable[tuple[str, torch.Tensor]], trained: Mapping[str, torch.Tensor],
                        whole: Iterable[str]) -> str:
    """SHA-256 over every parameter's frozen entries: ``whole`` tensors are skipped, and the ``trained`` flat
    indices of a tensor are hashed as zeros.

    Equal for a base model and for any model trained from it by the delta's entries alone, and different
    for another checkpoint (unless it differs only where the delta overwrites, which gives the same model
    after ``apply_delta`` anyway). One tensor at a time is copied to the host."""
    whole = set(whole)
    digest = hashlib.sha256()
    for name, param in sorted(params, key=lambda item: item[0]):
        if name in whole:
            continue
        value = param.detach()
        index = trained.get(name)
        if index is not None and index.numel():
            value = value.reshape(-1).clone()
            value[index.to(value.device)] = 0
        _hash_tensor(digest, name, value)
    return digest.hexdigest()


def mask_frozen_hash(params: Iterable[tuple[str, torch.Tensor]], mask: SparseMask) -> str:
    """:func:`frozen_content_hash` of the model's ``params`` (``named_parameters()`` of the plain model)
    outside what ``mask`` trains."""
    whole = fully_trained(mask)
    trained = {n: i for n, i in mask.indices.items() if n not in whole}
    return frozen_content_hash(params, trained, whole)


def fully_trained(mask: SparseMask) -> list[str]:
    return [n for n in mask.shapes if mask.kept(n) and mask.is_full(n)]


def save_delta(model: nn.Module, mask: SparseMask, path: str | os.PathLike, base_hash: str | None = None,
               fingerprint: str | None = None) -> int:
    """Write the mask's entries of ``model`` to ``path`` (atomic); returns the file size in bytes.

    ``model`` is the trained model (or the base itself): only the mask's entries may differ from the
    base. ``base_hash`` is :func:`mask_frozen_hash` of it, if already known (an engine keeps it between
    checkpoints). ``fingerprint`` is that of the plain base model (default: ``model``'s own, right for a
    model with no engine attached)."""
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
        "base_hash": base_hash or mask_frozen_hash(model.named_parameters(), mask),
        "base_hash_scope": FROZEN_HASH,
        "architecture": type(model).__name__,  # which Auto class rebuilds the model (merge)
        "shapes": {n: list(s) for n, s in mask.shapes.items()},
        "mask_config": mask.config,
        "num_selected": mask.num_selected,
    }
    save_tensors_with_header(path, tensors, DELTA_HEADER_KEY, header)
    return os.path.getsize(path)


def read_delta(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    return load_tensors_with_header(path, DELTA_HEADER_KEY, "delta", DELTA_FORMAT_VERSION)


def check_delta_base(model: nn.Module, header: dict, tensors: dict, path,
                     verify_base: bool = True) -> tuple[list[str], dict]:
    """Refuse what the delta cannot be applied to, before anything is written: a model with other parameter
    names or shapes, a damaged delta (see :func:`_check_entries`), and, with ``verify_base``, a base whose frozen
    weights differ from the ones the delta was trained from. Returns the delta's whole tensors' names and its
    partly-trained entries (:func:`sparse_entries`)."""
    if header["fingerprint"] != model_fingerprint(model):
        raise DeltaMismatchError(
            f"{path} was trained from a model with other parameter names or shapes "
            f"({header.get('mask_config', {}).get('model', 'unknown')}); load that base model first."
        )
    whole, entries = dense_tensor_names(tensors), sparse_entries(tensors)
    _check_entries(tensors, whole, entries, dict(model.named_parameters()), path)  # the hash reads the indices
    if verify_base and header.get("base_hash") and _base_hash(model, header, whole, entries) != header["base_hash"]:
        raise DeltaMismatchError(
            f"{path} was trained from a base model whose weights differ from this one's (same architecture, "
            "other checkpoint). Load the exact base checkpoint the delta was made from."
        )
    return whole, entries


def _base_hash(model: nn.Module, header: dict, whole: list[str], entries: dict) -> str:
    if header.get("base_hash_scope") == FROZEN_HASH:
        trained = {n: index for n, (index, _) in entries.items()}
        return frozen_content_hash(model.named_parameters(), trained, whole)
    return base_content_hash(model, skip=whole)  # a delta written before the scope existed


def _refuse_non_finite(value: torch.Tensor, name: str, path) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{path} holds NaN/inf values in {name}: the run that wrote it diverged. Retrain with a "
                         "lower learning rate (or without fp16), or use an earlier checkpoint's delta.")


def _check_entries(tensors: dict, whole: list[str], entries: dict, params: dict, path) -> None:
    """A damaged delta: indices without values (or of another count), indices outside their tensor (negative ones
    included), tensors this model does not have, a whole tensor of another shape, non-finite values."""
    for key in tensors:
        if key.endswith(_INDEX) and key[: -len(_INDEX)] + _VALUES not in tensors:
            raise ValueError(f"{path} is corrupt: {key[: -len(_INDEX)]} has indices but no values.")
    for name in whole + list(entries):
        if name not in params:
            raise ValueError(f"{path} is corrupt: it holds {name}, which this model does not have.")
    for name in whole:
        value = tensors[name + _DENSE]
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(f"{path} is corrupt: {name} is stored as {tuple(value.shape)}, the model's is "
                             f"{tuple(params[name].shape)}.")
        _refuse_non_finite(value, name, path)
    for name, (index, values) in entries.items():
        numel = params[name].numel()
        if index.numel() != values.numel():
            raise ValueError(f"{path} is corrupt: {name} has {index.numel()} indices but {values.numel()} values.")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
            raise ValueError(f"{path} is corrupt: indices of {name} fall outside its {numel} entries "
                             f"(min {int(index.min())}, max {int(index.max())}).")
        _refuse_non_finite(values, name, path)


def _holds_delta(params: dict, tensors: dict, whole: list[str], entries: dict) -> bool:
    """Whether every entry the delta writes already has the delta's value (a second application)."""
    for name in whole:
        if not torch.equal(params[name].detach().cpu(), tensors[name + _DENSE].to(params[name].dtype)):
            return False
    for name, (index, values) in entries.items():
        current = params[name].detach().reshape(-1)[index.to(params[name].device)].cpu()
        if not torch.equal(current, values.to(current.dtype)):
            return False
    return bool(tensors)


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
    whole, entries = check_delta_base(model, header, tensors, path, verify_base)
    params = dict(model.named_parameters())
    if verify_base and _holds_delta(params, tensors, whole, entries):
        raise DeltaMismatchError(
            f"This model already holds every value of {path}: it is the fine-tuned model (the delta was applied "
            "before), not the base it was trained from. Load the base checkpoint to apply the delta to.")
    for name in whole:
        params[name].copy_(tensors[name + _DENSE])
    for name, (index, values) in entries.items():
        target = params[name]
        target.view(-1)[index.to(target.device)] = values.to(target.device, target.dtype)
    return model
