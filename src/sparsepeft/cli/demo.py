"""``sparsepeft demo``: FISH Mask vs full fine-tuning of the packaged MiniLM on the packaged data, offline.

Each method runs in its own process, so its peak memory is its own and not the maximum of both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DEMO_RUNS = {
    # Sparse updates of 0.5% of the weights need a larger step than full fine-tuning (FISH Mask used
    # 5x); both rates were picked on the demo's dev set, see docs/benchmarks.md.
    "full": ["--method", "full", "--learning-rate", "5e-5"],
    "fish": ["--method", "fish", "--engine", "sparse", "--learning-rate", "2e-3", "--num-samples", "256"],
}
COMMON = ["--task", "demo", "--num-train-epochs", "3", "--per-device-train-batch-size", "16",
          "--per-device-eval-batch-size", "64", "--max-seq-length", "64", "--save-strategy", "no",
          "--logging-strategy", "no", "--report-to", "none", "--disable-tqdm", "true", "--seed", "0"]


def run_demo(output_dir: str = "sparsepeft-demo", extra: list[str] | None = None) -> dict[str, dict]:
    results = {}
    for method, flags in DEMO_RUNS.items():
        out = Path(output_dir) / method
        print(f"[demo] training with --method {method} ...", flush=True)
        command = [sys.executable, "-m", "sparsepeft", "train", *COMMON, *flags, "--output-dir", str(out),
                   "--overwrite-output-dir", "true", *(extra or [])]  # the demo's own folders: rerunning replaces them
        subprocess.run(command, check=True)
        results[method] = json.loads((out / "results.json").read_text())
    print(format_table(results))
    return results


def format_table(results: dict[str, dict]) -> str:
    rows = [("method", "dev accuracy", "trainable params", "trainable state MB", "optimizer state MB",
             "Fisher + mask s", "train s", "train peak RSS MB", "mask peak RSS MB", "saved MB")]
    for method, r in results.items():
        rows.append((
            f"{method} ({r['engine']} engine)" if r.get("engine") else method,
            f"{r['metrics']['validation']['accuracy']:.4f}",
            f"{r['trainable_params']:,} ({100 * r['trainable_params'] / r['total_params']:.2f}%)",
            f"{r['trainable_state_bytes'] / 2**20:.2f}",
            f"{r['optimizer_state_bytes'] / 2**20:.2f}",
            f"{r.get('mask_seconds', 0.0):.1f}",
            f"{r['train_seconds']:.1f}",
            f"{r['train_peak_rss_mb']:.0f}",
            "-" if r.get("mask_peak_rss_mb") is None else f"{r['mask_peak_rss_mb']:.0f}",
            f"{r.get('delta_file_bytes', r['dense_checkpoint_bytes']) / 2**20:.2f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
