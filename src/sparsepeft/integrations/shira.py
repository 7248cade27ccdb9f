"""A sparse delta written as a PEFT SHiRA adapter, where the delta fits SHiRA's format.

SHiRA stores, per adapted ``nn.Linear``, (row, col) indices and values *added* to the base weight, and
PEFT's loader requires every layer to hold exactly ``r * (m + n)`` of them for the config's one ``r``
(it refuses other counts: "size mismatch for ...shira_weight"). A FISH delta has its own count per
layer, so each layer is padded to ``r * (m + n)`` entries — with ``r`` the smallest that fits every
layer — by entries whose value is zero at positions the delta did not train: the adapted model is the
delta's model exactly (up to the rounding of base + difference), and a user who goes on training the
adapter trains the padding too (reported). What SHiRA cannot hold is refused, by name: tensors that are
not an ``nn.Linear`` weight (embeddings, norms, biases), tensors trained in full, and layers whose
entries would need ``r * (m + n) > m * n``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..engines.delta import check_delta_base, dense_tensor_names, read_delta, sparse_entries
from ..models.peft import infer_peft_task_type


class ShiraExportError(ValueError):
    """The delta holds something a SHiRA adapter cannot express."""


def export_delta_as_shira(model: nn.Module, delta_path: str | os.PathLike, output_dir: str | os.PathLike) -> dict:
    """Write the delta at ``delta_path`` as a SHiRA adapter folder (``PeftModel.from_pretrained`` loads it).

    ``model`` is the base the delta was trained from (checked); it is left as it was. Returns a report:
    ``r``, layers, trained entries, padding entries.
    """
    from peft import ShiraConfig, get_peft_model

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty: choose a new folder for the adapter.")
    header, tensors = read_delta(delta_path)
    check_delta_base(model, header, tensors, delta_path)
    entries = sparse_entries(tensors)
    layers = _linear_layers(model, entries, dense_tensor_names(tensors))
    r = max((math.ceil(entries[n + ".weight"][0].numel() / sum(m.weight.shape)) for n, m in layers.items()), default=0)
    too_small = [f"{n} ({m.weight.shape[0]} x {m.weight.shape[1]})" for n, m in layers.items()
                 if r * sum(m.weight.shape) > m.weight.numel()]
    if not layers or too_small:
        raise ShiraExportError("SHiRA needs r*(m+n) <= m*n entries per layer with one r for all; at the r this delta "
                               f"needs ({r}) these layers are too small: {too_small[:6]}" if layers else
                               f"{delta_path} trains no entry of an nn.Linear weight: nothing for SHiRA to hold.")
    masks, values, padding = {}, {}, 0
    for name, layer in layers.items():
        index, trained = entries[name + ".weight"]
        weight = layer.weight.detach()
        chosen, difference = _pad(index, trained.to(weight.dtype) - weight.reshape(-1)[index], r * sum(weight.shape),
                                  weight.numel())
        padding += chosen.numel() - index.numel()
        mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        mask[chosen.to(weight.device)] = 1
        masks[id(layer.weight)] = mask.reshape(weight.shape)
        values[name] = difference  # in flat-index order, which is the row-major order PEFT reads the mask in
    config = ShiraConfig(r=r, target_modules=sorted(layers), task_type=infer_peft_task_type(model))
    config.mask_fn = lambda base_layer, _r, **_kwargs: masks[id(base_layer.weight)]
    peft_model = get_peft_model(model, config)
    try:
        for module_name, module in peft_model.named_modules():
            name = module_name.replace("base_model.model.", "", 1)
            if name in values and hasattr(module, "shira_weight"):
                with torch.no_grad():
                    module.shira_weight["default"].copy_(values[name])
        _save_atomically(peft_model, output_dir)
    finally:
        peft_model.unload()  # the caller's model, without the adapter layers
    trained = sum(entries[n + ".weight"][0].numel() for n in layers)
    return {"r": r, "layers": len(layers), "trained_entries": trained, "padding_entries": padding,
            "adapter_entries": trained + padding}


def _linear_layers(model: nn.Module, entries: dict, whole: list[str]) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    layers, refused = {}, list(whole)
    for name in entries:
        module_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        module = modules.get(module_name)
        if leaf == "weight" and type(module) is nn.Linear:
            layers[module_name] = module
        else:
            refused.append(name)
    if refused:
        raise ShiraExportError(
            f"A SHiRA adapter holds entries of nn.Linear weights only; this delta also trains {len(refused)} other "
            f"tensor(s): {sorted(refused)[:8]}. Keep it as a sparsepeft delta (`sparsepeft merge` gives a dense "
            "checkpoint), or train a mask restricted to linear weights with --always-train '' to export it.")
    return layers


def _pad(index: torch.Tensor, difference: torch.Tensor, size: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` sorted flat positions holding the delta's entries, the rest zero-valued untrained positions."""
    free = torch.ones(numel, dtype=torch.bool)
    free[index] = False
    extra = free.nonzero().flatten()[: size - index.numel()]
    positions = torch.cat([index, extra])
    filled = torch.cat([difference.cpu(), torch.zeros(extra.numel(), dtype=difference.dtype)])
    order = torch.argsort(positions)
    return positions[order], filled[order]


def _save_atomically(peft_model, output_dir: Path) -> None:
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        peft_model.save_pretrained(staging)
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
