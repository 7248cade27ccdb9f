"""What sparsepeft needs to know about a model's structure: its stack of transformer blocks."""

from .blocks import BlockDiscoveryError, BlockParameters, block_parameters, find_blocks

__all__ = ["BlockDiscoveryError", "BlockParameters", "block_parameters", "find_blocks"]
