"""Atomic file writes: a crash mid-save never leaves a half-written mask, delta or results file."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a process killed mid-save
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the usual mode
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def save_tensors_with_header(path: str | os.PathLike, tensors: dict, header_key: str, header: dict) -> None:
    """safetensors file whose metadata carries a JSON header under ``header_key``; written atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={header_key: json.dumps(header)})


def load_tensors_with_header(path: str | os.PathLike, header_key: str, what: str, format_version: int):
    """Read a file written by :func:`save_tensors_with_header`, with errors that say what is wrong.

    ``what`` names the kind of file in messages ("mask", "delta").
    """
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {what} file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if header_key not in metadata:
                raise ValueError(f"{path} is a safetensors file but not a sparsepeft {what} (no '{header_key}' header).")
            header = json.loads(metadata[header_key])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (json.JSONDecodeError, OSError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"Cannot read the {what} file {path}: {error}. It may be truncated or corrupt.") from error
    if header.get("format_version", 0) > format_version:
        raise ValueError(f"{path} was written by a newer sparsepeft ({what} format {header['format_version']}); upgrade.")
    return header, tensors


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    Freed tensors under glibc's mmap threshold stay in the heap, so after a phase of many mid-sized
    allocations the process keeps their pages and the next phase's peak starts above where it should."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
