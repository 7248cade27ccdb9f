"""``SparseMask``: which entries of which tensors are trained, and how it was chosen.

Stored as sorted flat indices per tensor (memory proportional to the kept entries, not to the model),
saved with safetensors plus a JSON header that fingerprints the model it was made for — a mask applied
to another model is refused with the names that differ, instead of training the wrong entries.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..utils.io import load_tensors_with_header, save_tensors_with_header
from .budget import BudgetError
from .topk import DEFAULT_ALWAYS_TRAIN, budget_for, matches_module, partitioned_topk

FORMAT_VERSION = 1
HEADER_KEY = "sparsepeft_mask"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")
# How one budget is shared: one ranking over every candidate (the FISH Mask reference); each tensor, or each
# block (embeddings, layer i, head), a share in proportion to its size, ranked inside it
STRATEGIES = ("global", "per_tensor", "per_block")


class MaskMismatchError(ValueError):
    """The mask was made for a model with other parameter names or shapes."""


def model_fingerprint(model_or_shapes: nn.Module | Mapping[str, tuple]) -> str:
    """SHA-256 over every parameter's name and shape: equal for the same architecture, not for others."""
    if isinstance(model_or_shapes, nn.Module):
        shapes = {n: tuple(p.shape) for n, p in model_or_shapes.named_parameters()}
    else:
        shapes = {n: tuple(s) for n, s in model_or_shapes.items()}
    text = ";".join(f"{n}:{'x'.join(map(str, s))}" for n, s in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def layer_of(name: str) -> str:
    """The transformer block a parameter belongs to (``layer 3``), or ``embeddings`` / ``head`` / ``other``."""
    match = _LAYER_INDEX.search(name)
    if match:
        return f"layer {int(match.group(1))}"
    if "embed" in name or ".wte." in f".{name}" or ".wpe." in f".{name}":
        return "embeddings"
    if matches_module(name, DEFAULT_ALWAYS_TRAIN + ("lm_head", "pooler")):
        return "head"
    return "other"


def strategy_part(strategy: str) -> Callable[[str], object]:
    """The part of the model each candidate is ranked within under ``strategy`` (see :data:`STRATEGIES`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown selection strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
    return {"global": lambda name: None, "per_tensor": lambda name: name, "per_block": layer_of}[strategy]


def module_type_of(name: str) -> str:
    """What kind of module a parameter sits in, the same for every block (``attention.self.query``)."""
    module = name.rsplit(".", 1)[0]
    match = _LAYER_INDEX.search(name)
    if match:
        return module[match.end() :] if match.end() <= len(module) else module
    return module.split(".")[-1]


@dataclass
class SparseMask:
    """Kept entries per candidate tensor.

    Attributes:
        shapes: every candidate tensor's shape, kept entries or not (defines the scope of the mask).
        indices: sorted flat indices of the kept entries; a tensor absent here keeps nothing.
        fingerprint: :func:`model_fingerprint` of the model the mask was made for.
        config: how the mask was made (keep ratio, selection, Fisher mode, samples, seed, ...).
    """

    shapes: dict[str, tuple[int, ...]]
    indices: dict[str, torch.Tensor]
    fingerprint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [n for n in self.indices if n not in self.shapes]
        if unknown:
            raise ValueError(f"Mask indices for tensors outside its shapes: {unknown[:5]}")
        for name, idx in self.indices.items():
            idx = torch.as_tensor(idx, dtype=torch.int64).flatten()
            numel = _numel(self.shapes[name])
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise ValueError(f"Mask indices of {name} fall outside its {numel} entries: the file is corrupt.")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                idx = torch.unique(idx)
            self.indices[name] = idx

    # ----------------------------------------------------------------- counting
    @property
    def num_candidates(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())

    @property
    def num_selected(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def density(self) -> float:
        return self.num_selected / max(1, self.num_candidates)

    def kept(self, name: str) -> int:
        idx = self.indices.get(name)
        return 0 if idx is None else int(idx.numel())

    def is_full(self, name: str) -> bool:
        return self.kept(name) == _numel(self.shapes[name])

    def tensor_counts(self) -> dict[str, tuple[int, int]]:
        """``{name: (kept, total)}`` for every candidate tensor."""
        return {n: (self.kept(n), _numel(s)) for n, s in self.shapes.items()}

    def _grouped(self, key) -> dict[str, tuple[int, int]]:
        groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for name, (kept, total) in self.tensor_counts().items():
            group = groups[key(name)]
            group[0] += kept
            group[1] += total
        return {k: (v[0], v[1]) for k, v in groups.items()}

    def layer_counts(self) -> dict[str, tuple[int, int]]:
        return self._grouped(layer_of)

    def module_type_counts(self) -> dict[str, tuple[int, int]]:
        return self._grouped(module_type_of)

    def cell_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(kept, total) per (block, module type): where the budget went, as the density plot shows it."""
        return self._grouped(lambda name: (layer_of(name), module_type_of(name)))

    def allocation(self, top: int = 5) -> dict[str, Any]:
        """Where the budget went: each module type's and each block's share of the kept entries, and the
        tensors holding the most (a global ranking can put most of it into one tensor next to the head)."""
        total = max(1, self.num_selected)

        def shares(counts: dict[str, tuple[int, int]]) -> dict[str, dict[str, float | int]]:
            ordered = sorted(counts.items(), key=lambda item: -item[1][0])
            return {k: {"kept": a, "share": a / total, "density": a / max(1, b)} for k, (a, b) in ordered if a}

        tensors = sorted(((n, k) for n, (k, _) in self.tensor_counts().items() if k), key=lambda item: -item[1])
        return {"num_selected": self.num_selected,
                "tensors_with_entries": len(tensors), "candidate_tensors": len(self.shapes),
                "per_module_type": shares(self.module_type_counts()), "per_block": shares(self.layer_counts()),
                "top_tensors": [{"name": n, "kept": k, "share": k / total, "density": k / max(1, _numel(self.shapes[n]))}
                                for n, k in tensors[:top]]}

    def row_allocation(self, name: str, top: int = 10) -> dict[str, Any]:
        """How one matrix's kept entries fall over its rows. For a vocabulary embedding a row is one token's
        vector (and, where the output head is tied to it, that token's logit too): a whole row kept trains
        everything the model holds about that one token."""
        shape = self.shapes[name]
        if len(shape) != 2:
            raise ValueError(f"{name} has shape {tuple(shape)}: rows are defined for a matrix only.")
        rows, width = int(shape[0]), int(shape[1])
        index = self.indices.get(name, torch.empty(0, dtype=torch.int64))
        per_row = torch.bincount(index // width, minlength=rows)
        order = per_row.argsort(descending=True, stable=True)[:top]
        return {"tensor": name, "kept": int(index.numel()), "rows": rows, "row_width": width,
                "rows_with_entries": int((per_row > 0).sum()), "full_rows": int((per_row == width).sum()),
                "top_rows": [{"row": int(r), "kept": int(per_row[r])} for r in order if per_row[r]]}

    def allocation_line(self) -> str:
        """One line for a log: the top tensor's share and the largest module types'."""
        report = self.allocation(top=1)
        head = report["top_tensors"][0] if report["top_tensors"] else None
        kinds = ", ".join(f"{k} {100 * v['share']:.0f}%" for k, v in list(report["per_module_type"].items())[:3])
        return (f"{self.num_selected:,} entries in {report['tensors_with_entries']} of {report['candidate_tensors']} "
                f"tensors" + (f"; {100 * head['share']:.0f}% in {head['name']}" if head else "") + f"; by type: {kinds}")

    def variant(self) -> dict[str, Any]:
        """Which selection made the mask: score, candidates, how the budget was shared, when it was measured."""
        keys = ("selection", "importance", "candidates", "strategy", "fisher_at", "budget_spec", "budget", "warmup",
                "reselection")
        return {k: self.config[k] for k in keys if self.config.get(k) is not None}

    def variant_line(self) -> str:
        """The variant in one line for a log (``fisher over all, global, at init, budget lora:r=8 = 74,498``)."""
        v = self.variant()
        fisher_based = v.get("selection") in (None, "fisher")
        score = v.get("importance", v.get("selection", "?")) if fisher_based else v["selection"]
        budget = f", budget {v['budget_spec']} = {v.get('budget', self.num_selected):,}" if "budget_spec" in v else ""
        again = v.get("reselection")
        again = (f", re-selected every {again['every']} steps ({again['rate']:g} at first, scored on "
                 f"{again['accumulation']} steps)" if again else "")
        return (f"{score} over {v.get('candidates', 'all')} candidates, {v.get('strategy', 'global')}, "
                f"at {v.get('fisher_at', 'init')}{budget}{again}")

    def summary(self) -> dict[str, Any]:
        return {
            "num_selected": self.num_selected,
            "num_candidates": self.num_candidates,
            "density": self.density,
            "per_layer": {k: {"kept": a, "total": b} for k, (a, b) in self.layer_counts().items()},
            "per_module_type": {k: {"kept": a, "total": b} for k, (a, b) in self.module_type_counts().items()},
            "allocation": self.allocation(),
            "config": self.config,
        }

    # ----------------------------------------------------------------- tensors
    def dense(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean tensor of the parameter's shape, True where the entry is trained."""
        out = torch.zeros(_numel(self.shapes[name]), dtype=torch.bool, device=device)
        if name in self.indices:
            out[self.indices[name].to(out.device)] = True
        return out.reshape(self.shapes[name])

    def digest(self) -> str:
        """SHA-256 over every candidate's name, shape and kept indices: equal only for identical masks."""
        hasher = hashlib.sha256()
        for name in sorted(self.shapes):
            hasher.update(f"{name}:{tuple(self.shapes[name])};".encode())
            if name in self.indices:
                hasher.update(self.indices[name].to(torch.int64).contiguous().numpy().tobytes())
        return hasher.hexdigest()

    # ----------------------------------------------------------------- model checks
    def check_compatible(self, model: nn.Module) -> None:
        """Raise :class:`MaskMismatchError` naming what differs if ``model`` is not the mask's model."""
        params = {n: tuple(p.shape) for n, p in model.named_parameters()}
        missing = [n for n in self.shapes if n not in params]
        wrong = [f"{n}: mask {tuple(self.shapes[n])} vs model {params[n]}" for n in self.shapes if n in params and tuple(self.shapes[n]) != params[n]]
        if missing or wrong:
            details = "; ".join(
                ([f"missing in the model: {missing[:3]}{' ...' if len(missing) > 3 else ''}"] if missing else [])
                + ([f"shape differs: {wrong[:3]}"] if wrong else [])
            )
            raise MaskMismatchError(
                f"This mask was made for another model ({details}). Recompute it for this model with "
                "`sparsepeft mask`, or load the model the mask was made for."
            )
        if self.fingerprint and self.fingerprint != model_fingerprint(model):
            made_for = self.config.get("model", "another model")
            raise MaskMismatchError(
                f"The mask was made for {made_for}, whose parameters differ from this model's (fingerprint "
                "mismatch), though every masked tensor exists here. Recompute the mask for this model."
            )

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` atomically: safetensors of indices plus the JSON header in its metadata."""
        tensors = OrderedDict()
        for name, idx in self.indices.items():
            if idx.numel():
                small = _numel(self.shapes[name]) < 2**31
                tensors[name] = idx.to(torch.int32 if small else torch.int64).contiguous()
        header = {
            "format_version": FORMAT_VERSION,
            "shapes": {n: list(s) for n, s in self.shapes.items()},
            "fingerprint": self.fingerprint,
            "config": self.config,
            "num_selected": self.num_selected,
            "allocation": self.allocation(),
        }
        save_tensors_with_header(path, tensors, HEADER_KEY, header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SparseMask":
        header, tensors = load_tensors_with_header(path, HEADER_KEY, "mask", FORMAT_VERSION)
        indices = {name: value.to(torch.int64) for name, value in tensors.items()}
        shapes = {n: tuple(s) for n, s in header["shapes"].items()}
        mask = cls(shapes=shapes, indices=indices, fingerprint=header.get("fingerprint"), config=header.get("config", {}))
        if mask.num_selected != header.get("num_selected", mask.num_selected):
            raise ValueError(f"{path} is corrupt: it holds {mask.num_selected} entries, its header says {header['num_selected']}.")
        return mask

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        from .plot import plot_mask_density

        title = title or f"{self.num_selected:,} of {self.num_candidates:,} entries ({100 * self.density:.3f}%)"
        top = self.allocation(top=3)["top_tensors"]
        note = f"{self.variant_line()}\ntop tensors: " + "; ".join(f"{t['name']} {100 * t['share']:.1f}%" for t in top)
        plot_mask_density(self.cell_counts(), path, title, note=note)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def select_mask(
    scores: Mapping[str, torch.Tensor],
    keep_ratio: float = 0.005,
    *,
    strategy: str = "global",
    always_train: tuple[str, ...] | list[str] = DEFAULT_ALWAYS_TRAIN,
    model: nn.Module | None = None,
    config: dict[str, Any] | None = None,
    budget: int | None = None,
) -> SparseMask:
    """Keep the ``keep_ratio`` highest-scoring entries of the candidate tensors in ``scores``.

    Args:
        scores: per-entry importance (e.g. :func:`estimate_fisher`); its tensors are the candidates.
        strategy: ``"global"`` (one ranking, the FISH Mask reference), ``"per_tensor"`` or ``"per_block"`` (each
            tensor or each block a share of the budget in proportion to its size, ranked inside it).
        always_train: modules trained in full (the freshly initialised task head by default); their
            entries count inside the budget.
        model: if given, the mask is fingerprinted to it and refused on any other model.
        budget: an exact number of entries to keep (overrides ``keep_ratio``; see :class:`Budget`).
    """
    part_of = strategy_part(strategy)
    _check_scores(scores, model)
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    num_candidates = sum(s.numel() for s in scores.values())
    ratio_given = keep_ratio if budget is None else None
    if budget is None:
        budget = budget_for(keep_ratio, num_candidates)
    elif not (1 <= budget <= num_candidates):
        raise BudgetError(f"A budget of {budget} entries is outside 1..{num_candidates}, the number of candidates.")
    forced = [n for n in scores if matches_module(n, always_train)]
    forced_count = sum(scores[n].numel() for n in forced)
    if forced_count > budget:
        raise BudgetError(
            f"The budget of {budget} entries is smaller than the {forced_count} entries of the always-trained "
            f"modules {sorted(set(forced))[:4]}, which count inside it. Raise the budget, or pass always_train=() "
            "to rank the head like the rest."
        )
    ranked = {n: s for n, s in scores.items() if n not in forced}
    indices = partitioned_topk(ranked, budget - forced_count, part_of)
    for name in forced:
        indices[name] = torch.arange(scores[name].numel())
    indices = {n: indices[n] for n in scores if indices[n].numel()}
    info = {"keep_ratio": ratio_given or budget / num_candidates, "budget": budget, "strategy": strategy, "always_train": list(always_train), **(config or {})}
    return SparseMask(
        shapes=shapes,
        indices=indices,
        fingerprint=model_fingerprint(model) if model is not None else None,
        config=info,
    )


def _check_scores(scores: Mapping[str, torch.Tensor], model: nn.Module | None) -> None:
    """Scores must be floating tensors, and, when the model is given, shaped like the parameters they name."""
    not_scores = [f"{n} ({type(v).__name__})" for n, v in scores.items()
                  if not isinstance(v, torch.Tensor) or not (v.is_floating_point() or v.dtype == torch.bool)]
    if not_scores:
        raise TypeError(f"Scores must be floating-point tensors, one per parameter: {not_scores[:3]}.")
    if model is None:
        return
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    unknown = [n for n in scores if n not in params]
    wrong = [f"{n}: scores {tuple(v.shape)} vs parameter {params[n]}" for n, v in scores.items()
             if n in params and tuple(v.shape) != params[n]]
    if unknown or wrong:
        raise ValueError("These scores do not belong to this model's parameters: "
                         + "; ".join(([f"not parameters of the model: {unknown[:3]}"] if unknown else [])
                                     + ([f"shape differs: {wrong[:3]}"] if wrong else []))
                         + ". Compute the scores on the model you pass (e.g. estimate_fisher(model, ...)).")


def random_mask(
    model: nn.Module,
    keep_ratio: float = 0.005,
    *,
    params=None,
    strategy: str = "global",
    always_train: tuple[str, ...] | list[str] = DEFAULT_ALWAYS_TRAIN,
    seed: int = 0,
    budget: int | None = None,
) -> SparseMask:
    """The random-selection baseline: same candidates, same budget, uniformly random entries."""
    from ..importance.fisher import scored_parameters

    generator = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(p.shape, generator=generator) for n, p in scored_parameters(model, params).items()}
    return select_mask(
        scores, keep_ratio, strategy=strategy, always_train=always_train, model=model,
        config={"selection": "random", "seed": seed}, budget=budget,
    )


def embedding_rows(mask: SparseMask, model, tokenizer=None, top: int = 40) -> dict | None:
    """Which vocabulary rows of the input embedding a mask trains, each top row's token, and whether the output
    head is the same matrix (then those rows are also the tokens' logits: on SmolLM2 FISH keeps whole rows of the
    answers' tokens). None when the mask keeps nothing there."""
    get_input = getattr(model, "get_input_embeddings", None)
    weight = getattr(get_input(), "weight", None) if get_input is not None else None
    name = next((n for n, p in model.named_parameters() if p is weight), None) if weight is not None else None
    if name is None or name not in mask.shapes or not mask.kept(name):
        return None
    report = mask.row_allocation(name, top)
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if get_output is not None else None
    report["tied_to_output_head"] = getattr(head, "weight", None) is weight
    for row in report["top_rows"]:
        row["token"] = tokenizer.decode([row["row"]]) if tokenizer is not None else None
    return report


def embedding_rows_line(report: dict) -> str:
    """One log line: how many rows the embedding's entries cover, how many whole, and the fullest rows' tokens."""
    tokens = ", ".join(f"{row['token']!r} {row['kept']}" for row in report["top_rows"][:6])
    tied = " (tied to the output head: those tokens' logits too)" if report["tied_to_output_head"] else ""
    return (f"{report['kept']:,} entries of {report['tensor']} over {report['rows_with_entries']:,} of "
            f"{report['rows']:,} rows, {report['full_rows']} whole{tied}; fullest: {tokens}")
