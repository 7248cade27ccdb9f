"""Shared helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def machine() -> dict:
    return {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def timed(fn, device: str = "cpu") -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median(values) -> float:
    return float(statistics.median(values))


def random_token_data(n: int, seq_len: int, vocab: int, num_labels: int = 2, seed: int = 0) -> list[dict]:
    """Full-length sequences of random tokens: the compute of real text of that length, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (n, seq_len), generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return [{"input_ids": ids[i].tolist(), "attention_mask": [1] * seq_len, "labels": int(labels[i])} for i in range(n)]


def write_json(path: str | Path, payload) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
