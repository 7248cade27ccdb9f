"""What a run may do with its ``--output-dir``, decided before any model is loaded.

A folder that holds another run's files is refused (two runs mixed in one folder leave, say, a FISH run's
``sparse_delta.safetensors`` beside a LoRA adapter, and nothing tells them apart) unless
``--overwrite-output-dir``, which removes what a run of this package writes there and says so; files it
does not know are left alone. A run that resumes from a checkpoint continues the run in its folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger("sparsepeft")

# What `sparsepeft train|mask` writes: its own files, and those of Trainer.save_model / save_pretrained
RUN_FILES = (
    "results.json", "mask_summary.json", "sparse_mask.safetensors", "sparse_delta.safetensors", "mask_density.png",
    "ird_report.json", "ird_rounds.png", "layerwise_history.json", "layerwise_heatmap.png",
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "config.json", "generation_config.json",
    "training_args.bin", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja", "tokenizer.model",
)
MARKERS = ("results.json", "mask_summary.json", "sparse_mask.safetensors", "sparse_delta.safetensors",
           "model.safetensors", "adapter_model.safetensors")


def _run_entries(folder: Path) -> list[Path]:
    entries = [folder / name for name in RUN_FILES if (folder / name).is_file()]
    entries += sorted(p for p in folder.glob("checkpoint-*") if p.is_dir())
    entries += sorted(p for p in folder.glob("model-*-of-*.safetensors"))
    return entries


def prepare_output_dir(output_dir: str, overwrite: bool, resume_from_checkpoint: str | None) -> None:
    """Refuse (or, with ``overwrite``, clear) another run's files; check that the folder can be created or written
    (without creating it: a run that fails later writes nothing) and that the checkpoint to resume from exists.
    Raises ValueError naming the problem and the flag that fixes it."""
    folder = Path(output_dir)
    resuming = bool(resume_from_checkpoint) and str(resume_from_checkpoint).lower() not in ("false", "none")
    if resuming and str(resume_from_checkpoint).lower() != "true" and not os.path.isdir(resume_from_checkpoint):
        raise ValueError(f"--resume-from-checkpoint {resume_from_checkpoint}: no such folder. Give a "
                         f"checkpoint-N folder a run wrote (e.g. {folder / 'checkpoint-500'}).")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output-dir {folder} is a file, not a folder: choose a folder for the run's outputs.")
    if folder.is_dir() and not resuming:
        found = _run_entries(folder)
        if any(p.name in MARKERS or p.name.startswith("checkpoint-") for p in found):
            names = ", ".join(p.name for p in found[:6]) + (" ..." if len(found) > 6 else "")
            if not overwrite:
                raise ValueError(f"--output-dir {folder} holds another run's files ({names}). Choose a new folder, "
                                 "or pass --overwrite-output-dir to remove them first.")
            for path in found:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            logger.warning("--overwrite-output-dir: removed the previous run's %s from %s", names, folder)
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"Cannot create --output-dir {folder}: {existing} is a file. Choose another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot {'write into' if existing == folder.absolute() else 'create'} --output-dir {folder} "
                         f"({existing} is not writable): choose a folder you can write to.")
