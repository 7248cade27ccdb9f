"""Fisher-chosen masks for PEFT's SHiRA adapters.

SHiRA (PEFT's ``ShiraConfig``) trains ``r * (m + n)`` entries of each targeted ``nn.Linear`` weight
(``m x n``) — LoRA's parameter count at rank ``r`` — as a value vector plus fixed (row, col) indices,
saved and loaded like any PEFT adapter. PEFT draws those entries at random; ``config.mask_fn`` lets a
user supply them. :func:`shira_mask_fn` supplies the top-``r(m+n)`` entries of each layer by the
diagonal empirical Fisher of the *base* model, from one Fisher pass over the targeted weights only::

    config = ShiraConfig(r=8, target_modules=["q_proj", "v_proj"])
    config.mask_fn = sparsepeft.shira_mask_fn(model, train_examples, target_modules=config.target_modules)
    model = get_peft_model(model, config)

The adapter that results is a plain SHiRA adapter: ``PeftModel.from_pretrained`` reads the indices back
from the adapter file (the function is not needed to load it).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from ..importance.fisher import estimate_fisher
from .topk import global_topk

MaskFn = Callable[..., torch.Tensor]


def shira_targets(model: nn.Module, target_modules=None) -> dict[str, nn.Linear]:
    """The layers PEFT's SHiRA would wrap, by module name, with PEFT's own matching rules."""
    from peft import ShiraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils import TRANSFORMERS_MODELS_TO_SHIRA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        target_modules = DEFAULT_TARGETS.get(model_type)
        if target_modules is None:
            raise ValueError(f"PEFT has no default SHiRA target modules for {type(model).__name__} "
                             f"(model_type {model_type!r}): pass target_modules, e.g. ['q_proj', 'v_proj'].")
    probe = ShiraConfig(target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules)
    matched = {name: module for name, module in model.named_modules()
               if name and _is_match(check_target_module_exists(probe, name))}
    if not matched:
        raise ValueError(f"target_modules {target_modules} match no module of {type(model).__name__}.")
    not_linear = sorted(f"{name} ({type(module).__name__})" for name, module in matched.items()
                        if type(module) is not nn.Linear)
    if not_linear:
        raise ValueError(f"SHiRA adapts nn.Linear layers only; these targets are not: {not_linear[:6]}. Narrow "
                         "target_modules to linear layers (GPT-2's Conv1D is not supported by PEFT's SHiRA).")
    return matched


def _is_match(found) -> bool:
    """``check_target_module_exists`` answers True, a regex match, or a falsy/"excluded" marker."""
    return bool(found) and not type(found).__name__.startswith("_Excluded")


def shira_fisher(model: nn.Module, data, target_modules=None, **fisher_kwargs) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the targeted layers' weights only (one batched pass; other weights are not scored)."""
    names = [f"{name}.weight" for name in shira_targets(model, target_modules)]
    return estimate_fisher(model, data, params=names, **fisher_kwargs)


def shira_mask_fn(model: nn.Module, data=None, *, fisher: Mapping[str, torch.Tensor] | None = None,
                  target_modules=None, **fisher_kwargs) -> MaskFn:
    """A ``ShiraConfig.mask_fn`` that keeps each layer's top-``r(m+n)`` Fisher entries.

    Args:
        model: the base model that ``get_peft_model`` will wrap (layers are recognised by their weight tensor,
            so pass the same object, before wrapping).
        data: examples to measure the Fisher on (as for :func:`estimate_fisher`; ``num_samples``,
            ``batch_size``, ``collate_fn`` ... go through ``fisher_kwargs``). Or give ``fisher`` instead:
            a Fisher of this model's parameters, by name (e.g. from :func:`shira_fisher`).
        target_modules: the config's ``target_modules``; only those layers are scored.

    Ties go to the lowest flat position, so a mask never depends on the sort kernel.
    """
    if (fisher is None) == (data is None):
        raise ValueError("Give shira_mask_fn either data (to measure the Fisher on) or fisher (already measured).")
    if fisher is None:
        fisher = shira_fisher(model, data, target_modules, **fisher_kwargs)
    names_by_weight = {id(p): n for n, p in model.named_parameters()}
    _check_fisher_fits(model, fisher)

    def mask_fn(base_layer: nn.Module, r: int, **_peft_kwargs) -> torch.Tensor:
        if type(base_layer) is not nn.Linear:
            raise TypeError(f"SHiRA adapts nn.Linear layers only, got {type(base_layer).__name__}.")
        weight = base_layer.weight
        name = names_by_weight.get(id(weight))
        if name is None or name not in fisher:
            raise ValueError(f"No Fisher for the {tuple(weight.shape)} layer SHiRA asks about"
                             f"{f' ({name})' if name else ''}: the Fisher was measured on another model, or for "
                             "other target_modules. Build the mask_fn from the model you wrap, with the config's "
                             "target_modules.")
        rows, cols = weight.shape
        budget = r * (rows + cols)
        if budget > rows * cols:
            raise ValueError(f"SHiRA r={r} asks for r*(m+n) = {budget} entries of {name} ({rows} x {cols} = "
                             f"{rows * cols}): lower r to at most {rows * cols // (rows + cols)}.")
        kept = global_topk({name: fisher[name].detach()}, budget)[name]
        mask = torch.zeros(rows * cols, dtype=weight.dtype, device=weight.device)
        mask[kept.to(weight.device)] = 1
        return mask.reshape(rows, cols)

    mask_fn.fisher_names = sorted(fisher)  # what it covers, for error messages and reports
    return mask_fn


def _check_fisher_fits(model: nn.Module, fisher: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in fisher if n not in params]
    wrong = [f"{n}: Fisher {tuple(f.shape)} vs weight {tuple(params[n].shape)}"
             for n, f in fisher.items() if n in params and tuple(f.shape) != tuple(params[n].shape)]
    if missing or wrong:
        raise ValueError(f"This Fisher was not measured on this model: {(missing + wrong)[:4]} "
                         f"({len(missing)} unknown name(s), {len(wrong)} shape mismatch(es)).")


def shira_adapter_mask(model: nn.Module, adapter: str = "default"):
    """The entries a SHiRA adapter trains, as a :class:`SparseMask` over the adapted weights (named as in the base
    model): so a SHiRA run reports its allocation like every other mask."""
    from .mask import SparseMask

    shapes, indices = {}, {}
    for name, module in model.named_modules():
        found = getattr(module, "shira_indices", None)
        if not isinstance(found, dict) or adapter not in found:
            continue
        weight = module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight
        key = name.removeprefix("base_model.model.") + ".weight"
        rows, cols = found[adapter].to(torch.int64).cpu()
        shapes[key] = tuple(weight.shape)
        indices[key] = rows * weight.shape[1] + cols
    if not shapes:
        raise ValueError(f"The model holds no SHiRA adapter named {adapter!r}.")
    return SparseMask(shapes=shapes, indices=indices, config={"selection": "shira"})
