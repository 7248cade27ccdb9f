"""Finding the stack of transformer blocks of any model, wrapped by PEFT or not.

Bottleneck adapters are placed per block and layer-wise methods (IST, LISA) choose blocks, so both need
the ``nn.ModuleList`` that holds them: ``bert.encoder.layer``, ``model.layers`` (LLaMA, Mistral, Qwen),
``transformer.h`` (GPT-2). It is found by structure, not by a table of architectures: the module list
of same-class children that holds the most parameters. Unusual models name it with ``blocks_path``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class BlockDiscoveryError(ValueError):
    """The model's transformer blocks could not be found (or the given path is not a block list)."""


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the model's transformer blocks."""
    if blocks_path:
        try:
            blocks = model.get_submodule(blocks_path)
        except AttributeError:
            blocks = None
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise BlockDiscoveryError(
                f"{blocks_path!r} is not a non-empty nn.ModuleList of {type(model).__name__}. Give the dotted path "
                f"of the list of transformer blocks; candidates here: {_candidates(model)[:5]}.")
        return blocks_path, blocks
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise BlockDiscoveryError(
            f"Could not find the transformer blocks of {type(model).__name__}: no nn.ModuleList of same-class "
            "blocks holds parameters. Name the list with blocks_path='model.layers' (its dotted module path).")
    return best[1], best[2]


def _candidates(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module)]


@dataclass
class BlockParameters:
    """A model's trainable parameters grouped by transformer block.

    ``blocks[i]`` holds the trainable parameters under block ``i`` (its PEFT modules on a PEFT model, all its
    weights on a plain one); ``outside`` the trainable ones under no block (a task head, trained embeddings);
    ``block_ids`` the indices of the blocks that hold any, the candidates of layer-wise selection.
    """

    path: str
    num_blocks: int
    blocks: dict[int, list[tuple[str, nn.Parameter]]]
    outside: list[tuple[str, nn.Parameter]]

    @property
    def block_ids(self) -> list[int]:
        return sorted(self.blocks)

    def names(self) -> list[str]:
        return [name for i in self.block_ids for name, _ in self.blocks[i]] + [name for name, _ in self.outside]


def block_parameters(model: nn.Module, blocks_path: str | None = None) -> BlockParameters:
    """Group the parameters that require grad now by the block they live in."""
    path, blocks = find_blocks(model, blocks_path)
    prefix = f"{path}."
    grouped: dict[int, list[tuple[str, nn.Parameter]]] = {}
    outside: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            grouped.setdefault(index, []).append((name, param))
        else:
            outside.append((name, param))
    if not grouped:
        raise BlockDiscoveryError(
            f"None of the {len(blocks)} blocks at {path!r} holds a trainable parameter: add a PEFT method (LoRA, DoRA, "
            "bottleneck adapters) first, or pass blocks_path= if these are not the transformer blocks.")
    return BlockParameters(path, len(blocks), grouped, outside)
