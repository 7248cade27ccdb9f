"""Inject, save, load and remove bottleneck adapters on a transformers model.

PEFT has no bottleneck adapters, so sparsepeft provides them in PEFT's shape: a config dataclass, a
layer, and functions that mark only the adapters (and the task head) trainable and save just those
tensors with safetensors beside an ``adapter_config.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..models import find_blocks
from ..utils.names import matches_module
from ..utils.io import atomic_path, write_json
from .config import CONFIG_NAME, BottleneckConfig
from .layer import BottleneckAdapter, ParallelInputHook, ParallelOutputHook, SeriesHook

WEIGHTS_NAME = "adapter_model.safetensors"
CONTAINER = "bottleneck_adapters"

# Sublayer names inside one block, by family; the first layout whose modules all exist is used.
LAYOUTS = (
    {"attention_input": "attention", "attention_output": "attention.output.dense",
     "ffn_input": "intermediate", "ffn_output": "output.dense"},  # BERT, RoBERTa, ELECTRA, XLM-R
    {"attention_input": "self_attn", "attention_output": "self_attn.o_proj",
     "ffn_input": "mlp", "ffn_output": "mlp.down_proj"},  # LLaMA, Mistral, Qwen, Gemma
    {"attention_input": "attn", "attention_output": "attn.c_proj", "ffn_input": "mlp", "ffn_output": "mlp.c_proj"},  # GPT-2
)


def _layout(block: nn.Module, config: BottleneckConfig) -> dict[str, str]:
    names = dict(config.module_names or {})
    for layout in LAYOUTS:
        candidate = {**layout, **names}
        if all(_has(block, candidate[f"{loc}_{end}"]) for loc in config.locations for end in ("input", "output")):
            return candidate
    wanted = [f"{loc}_{end}" for loc in config.locations for end in ("input", "output")]
    raise ValueError(
        f"Could not find the sublayers of a {type(block).__name__} block for adapters at {config.locations}. "
        f"Name them with module_names={{{', '.join(repr(w) + ': ...' for w in wanted)}}} (module paths inside a block).")


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
        return True
    except AttributeError:
        return False


def _hidden_size(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"Cannot read the hidden size from {type(module).__name__}: adapters go after a projection.")
    return weight.shape[0] if isinstance(module, nn.Linear) else weight.shape[1]  # Conv1D stores [in, out]


def has_bottleneck_adapters(model: nn.Module) -> bool:
    return getattr(model, "_bottleneck_config", None) is not None


def add_bottleneck_adapters(model: nn.Module, config: BottleneckConfig | None = None) -> nn.Module:
    """Add adapters to every block of ``model`` (in place) and make them and the head the only trainable
    parameters. Returns ``model``."""
    config = config or BottleneckConfig()
    if has_bottleneck_adapters(model):
        raise RuntimeError("This model already has bottleneck adapters; remove_bottleneck_adapters(model) first.")
    _, blocks = find_blocks(model, config.blocks_path)
    handles = []
    reference = next(model.parameters())
    for block in blocks:
        names = _layout(block, config)
        container = nn.ModuleDict()
        for location in config.locations:
            output_module = block.get_submodule(names[f"{location}_output"])
            adapter = BottleneckAdapter(_hidden_size(output_module), config.bottleneck_size, config.non_linearity,
                                        config.scaling, config.dropout, config.init_std, config.zero_init_up)
            container[location] = adapter.to(device=reference.device, dtype=reference.dtype)
            if config.kind == "parallel":
                input_module = block.get_submodule(names[f"{location}_input"])
                handles.append(input_module.register_forward_pre_hook(ParallelInputHook(adapter), with_kwargs=True))
                handles.append(output_module.register_forward_hook(ParallelOutputHook(adapter)))
            else:
                handles.append(output_module.register_forward_hook(SeriesHook(adapter)))
        block.add_module(CONTAINER, container)
    model._bottleneck_config = config
    model._bottleneck_handles = handles
    for name, param in model.named_parameters():
        param.requires_grad_(_is_adapter_state(name, config))
    return model


def _is_adapter_state(name: str, config: BottleneckConfig) -> bool:
    return f".{CONTAINER}." in f".{name}" or matches_module(name, config.modules_to_save)


def remove_bottleneck_adapters(model: nn.Module) -> nn.Module:
    """Take the adapters out again (the base model's own parameters are untouched)."""
    if not has_bottleneck_adapters(model):
        return model
    for handle in model._bottleneck_handles:
        handle.remove()
    _, blocks = find_blocks(model, model._bottleneck_config.blocks_path)
    for block in blocks:
        if hasattr(block, CONTAINER):
            delattr(block, CONTAINER)
    del model._bottleneck_config, model._bottleneck_handles
    return model


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors and the saved modules (task head): everything a base checkpoint lacks."""
    if not has_bottleneck_adapters(model):
        raise ValueError("This model has no bottleneck adapters: add_bottleneck_adapters(model, config) first.")
    config = model._bottleneck_config
    return {n: p.detach() for n, p in model.named_parameters() if _is_adapter_state(n, config)}


def save_bottleneck_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (atomically) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.contiguous().cpu() for n, t in bottleneck_state_dict(model).items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(directory / CONFIG_NAME, model._bottleneck_config.to_dict())
    return directory


def load_bottleneck_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Add the adapters saved in ``directory`` to ``model`` (a freshly loaded base model) and load them."""
    directory = Path(directory)
    config = BottleneckConfig.from_pretrained(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}: the adapter weights are missing.")
    add_bottleneck_adapters(model, config)
    saved = load_file(str(weights))
    params = dict(model.named_parameters())
    missing = [n for n in params if _is_adapter_state(n, config) and n not in saved]
    unknown = [n for n in saved if n not in params]
    wrong = [n for n in saved if n in params and tuple(saved[n].shape) != tuple(params[n].shape)]
    if missing or unknown or wrong:
        remove_bottleneck_adapters(model)
        raise ValueError(f"The adapters in {directory} do not fit this model (missing {missing[:3]}, unexpected "
                         f"{unknown[:3]}, other shape {wrong[:3]}): load the base model they were trained on.")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    return model
