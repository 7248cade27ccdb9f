"""The adapter module and the hooks that splice it into a sublayer without touching the model's code.

Hooks, not wrappers: the base model keeps its module tree and parameter names (a base checkpoint still
loads into it), and the adapter's own parameters live under the block, ``...layer.3.bottleneck_adapters.ffn``.
The hooks are small callable objects that hold their adapter, so ``copy.deepcopy`` of the model keeps
each copy wired to its own adapters.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class BottleneckAdapter(nn.Module):
    """``x -> up(act(down(dropout(x)))) * scaling``; ``scaling`` is a plain attribute so layer-wise
    methods (IST's response suppression) can scale a block's adapter output."""

    def __init__(self, hidden_size: int, bottleneck_size: int, non_linearity: str = "relu", scaling: float = 1.0,
                 dropout: float = 0.0, init_std: float = 1e-2, zero_init_up: bool = True):
        super().__init__()
        if non_linearity not in ACT2FN:
            raise ValueError(f"Unknown non_linearity {non_linearity!r}; choose one of {sorted(ACT2FN)[:12]} ...")
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.up = nn.Linear(bottleneck_size, hidden_size)
        self.act = ACT2FN[non_linearity]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        if zero_init_up:
            nn.init.zeros_(self.up.weight)
        else:
            nn.init.normal_(self.up.weight, std=init_std)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(self.dropout(x)))) * self.scaling


def _first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def _add_to_output(output, delta: torch.Tensor):
    if isinstance(output, tuple):
        return (output[0] + delta, *output[1:])
    return output + delta


class SeriesHook:
    """Forward hook on a sublayer's output projection: ``h -> h + adapter(h)``."""

    def __init__(self, adapter: BottleneckAdapter):
        self.adapter = adapter

    def __call__(self, module, inputs, output):
        hidden = _first_tensor(output)
        return _add_to_output(output, self.adapter(hidden).to(hidden.dtype))


class ParallelInputHook:
    """Forward pre-hook on the sublayer: remembers its input for the adapter beside it."""

    def __init__(self, adapter: BottleneckAdapter):
        self.adapter = adapter

    def __call__(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.adapter._parallel_input = hidden
        return None


class ParallelOutputHook:
    """Forward hook on the sublayer's output projection: adds ``adapter(sublayer input)``."""

    def __init__(self, adapter: BottleneckAdapter):
        self.adapter = adapter

    def __call__(self, module, inputs, output):
        source = getattr(self.adapter, "_parallel_input", None)
        if source is None:
            raise RuntimeError("A parallel adapter's output projection ran without its sublayer's input: the "
                               "adapter's module_names do not describe this block (set ffn_input / attention_input).")
        self.adapter._parallel_input = None
        hidden = _first_tensor(output)
        return _add_to_output(output, self.adapter(source).to(hidden.dtype))
