"""Where a mask spends its budget: density per block and module type, as a PNG."""

from __future__ import annotations

import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..utils.io import atomic_path  # noqa: E402


def _save(fig, path: str | os.PathLike) -> None:
    """Lay out, write atomically as PNG, and free the figure."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _layer_sort_key(layer: str):
    match = re.match(r"layer (\d+)", layer)
    order = {"embeddings": -1, "other": 10**6, "head": 10**6 + 1}
    return (int(match.group(1)) if match else order.get(layer, 10**6), layer)


def plot_mask_density(cells: dict[tuple[str, str], tuple[int, int]], path: str | os.PathLike, title: str,
                      note: str | None = None) -> None:
    """Heat map of kept fraction (layer x module type) beside the kept count per layer.

    ``cells`` maps (layer, module type) to (kept, total) entries, e.g. :meth:`SparseMask.cell_counts`."""
    layers = sorted({layer for layer, _ in cells}, key=_layer_sort_key)
    types = sorted({kind for _, kind in cells})
    density = np.full((len(layers), len(types)), np.nan)
    per_layer = dict.fromkeys(layers, 0)
    for (layer, kind), (k, total) in cells.items():
        density[layers.index(layer), types.index(kind)] = 100.0 * k / max(total, 1)
        per_layer[layer] += k

    fig, (ax_map, ax_bar) = plt.subplots(
        1, 2, figsize=(max(8, 0.55 * len(types) + 5), max(3.5, 0.4 * len(layers) + 2.5)),
        gridspec_kw={"width_ratios": [max(len(types), 2), 2]},
    )
    norm = matplotlib.colors.PowerNorm(gamma=0.4, vmin=0, vmax=max(float(np.nanmax(density)), 1e-6))
    image = ax_map.imshow(density, aspect="auto", cmap="viridis", norm=norm)
    ax_map.set_xticks(range(len(types)), types, rotation=70, ha="right", fontsize=7)
    ax_map.set_yticks(range(len(layers)), layers, fontsize=8)
    ax_map.set_title("kept entries (% of tensor)")
    fig.colorbar(image, ax=ax_map, fraction=0.04)
    counts = [per_layer[layer] for layer in layers]
    ax_bar.barh(range(len(layers)), counts, color="tab:orange")
    ax_bar.set_yticks(range(len(layers)), [""] * len(layers))
    ax_bar.invert_yaxis()
    ax_bar.set_title("kept per layer")
    fig.suptitle(title)
    if note:  # where the budget went, in words: the tensors holding the largest shares
        fig.text(0.01, 0.005, note, fontsize=7, ha="left", va="bottom")
    _save(fig, path)


def plot_ird_rounds(report: dict, path: str | os.PathLike) -> None:
    """IRD's rounds: the sample and parameter ranges shrinking, the criterion, and how far masks move."""
    rounds = report["rounds"]
    x = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].plot(x, [r["samples"] for r in rounds], "o-", label="samples")
    axes[0].set_ylabel("samples")
    twin = axes[0].twinx()
    twin.plot(x, [r["parameter_range"] for r in rounds], "s--", color="tab:orange", label="parameter range")
    twin.set_yscale("log")
    twin.set_ylabel("parameter range (log)")
    axes[0].set_title("ranges")
    criterion = [r.get("criterion") for r in rounds]
    if any(c is not None for c in criterion):
        axes[1].plot(x, criterion, "o-", color="tab:green")
        axes[1].axvline(report["best_round"], color="grey", linestyle=":")
    axes[1].set_title(f"criterion: {report['config']['criterion']} (chosen: round {report['best_round']})")
    axes[2].plot(x, [r["overlap_with_fish"] for r in rounds], "o-", label="with FISH (round 0)")
    axes[2].plot(x, [r["overlap_with_previous"] if r["overlap_with_previous"] is not None else np.nan for r in rounds],
                 "s--", label="with previous round")
    axes[2].set_ylim(0, 1.05)
    axes[2].legend(fontsize=8)
    axes[2].set_title("mask overlap")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(x)
    _save(fig, path)


def plot_layer_heatmap(history: dict, path: str | os.PathLike) -> None:
    """Layer x step heat maps of a layer-wise run: which blocks trained, and (IST) how the scores moved."""
    blocks = history["block_ids"]
    selections = history["selections"]
    steps = max(len(selections), 1)
    chosen = np.zeros((len(blocks), steps))
    row = {b: i for i, b in enumerate(blocks)}
    for step, selected in enumerate(selections):
        for block in selected:
            chosen[row[block], step] = 1.0
    probes = history.get("probes") or []
    panels = 2 if probes else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6, min(16, 0.05 * steps + 5)), (0.25 * len(blocks) + 1.6) * panels),
                             squeeze=False)
    ax = axes[0][0]
    ax.imshow(chosen, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1,
              extent=(-0.5, steps - 0.5, len(blocks) - 0.5, -0.5))
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_ylabel("block")
    ax.set_xlabel("step")
    counts = chosen.sum(axis=1)
    ax.set_title(f"{history['config']['strategy']}: blocks trained per step (dark = trained; totals "
                 f"{', '.join(f'{b}:{int(c)}' for b, c in zip(blocks, counts))})", fontsize=9)
    if probes:
        scores = np.zeros((len(blocks), steps))
        current = np.zeros(len(blocks))
        marks = {p["step"]: np.asarray(p["scores"]) for p in probes}
        for step in range(steps):
            current = marks.get(step, current)
            scores[:, step] = current
        ax = axes[1][0]
        image = ax.imshow(scores, aspect="auto", interpolation="nearest", cmap="coolwarm",
                          extent=(-0.5, steps - 0.5, len(blocks) - 0.5, -0.5))
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
        ax.set_ylabel("block")
        ax.set_xlabel("step")
        ax.set_title("IST score s_l (high = cheap to suppress = drawn less often)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03)
    _save(fig, path)
