"""What sparsepeft needs to know about a model's structure: its stack of transformer blocks."""

from .blocks import BlockDiscoveryError, find_blocks

__all__ = ["BlockDiscoveryError", "find_blocks"]
