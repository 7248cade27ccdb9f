"""Bottleneck adapters (series/Houlsby, Pfeiffer, parallel), the PEFT method PEFT does not provide."""

from .config import BottleneckConfig
from .layer import BottleneckAdapter
from .model import (
    add_bottleneck_adapters,
    bottleneck_state_dict,
    has_bottleneck_adapters,
    load_bottleneck_adapters,
    remove_bottleneck_adapters,
    save_bottleneck_adapters,
)

__all__ = [
    "BottleneckAdapter",
    "BottleneckConfig",
    "add_bottleneck_adapters",
    "bottleneck_state_dict",
    "has_bottleneck_adapters",
    "load_bottleneck_adapters",
    "remove_bottleneck_adapters",
    "save_bottleneck_adapters",
]
