"""PEFT methods by name, their trainable scope, and budget counting on a reference config.

One table maps a method name to what builds it: PEFT's configs for the LoRA family, AdaLoRA, IA3, LoHa,
LoKr, VeRA and SHiRA; sparsepeft's own bottleneck adapters for ``adapter`` / ``houlsby`` / ``pfeiffer`` /
``parallel``. Options are PEFT's own field names (``r``, ``lora_alpha``, ``target_modules`` ...); for
adapters, :class:`BottleneckConfig`'s.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from ..adapters import BottleneckConfig, add_bottleneck_adapters, has_bottleneck_adapters

ADAPTER_KINDS = {"adapter": "series", "houlsby": "series", "series": "series", "pfeiffer": "pfeiffer",
                 "parallel": "parallel"}


def _lora_family(**fixed) -> Callable[[dict, str | None], Any]:
    def build(options: dict, task_type: str | None):
        from peft import LoraConfig

        options = {**fixed, **options}
        options.setdefault("r", 8)
        options.setdefault("lora_alpha", 2 * options["r"])  # the same scale s = alpha / r whatever the rank
        options.setdefault("lora_dropout", 0.1)
        return LoraConfig(task_type=task_type, **options)

    return build


def _simple(config_name: str, **defaults) -> Callable[[dict, str | None], Any]:
    def build(options: dict, task_type: str | None):
        import peft

        return getattr(peft, config_name)(task_type=task_type, **{**defaults, **options})

    return build


def _adalora(options: dict, task_type: str | None):
    from peft import AdaLoraConfig

    options = dict(options)
    if "r" in options:
        options.setdefault("target_r", options.pop("r"))
    options.setdefault("target_r", 8)
    options.setdefault("init_r", int(options["target_r"] * 1.5))
    options.setdefault("lora_alpha", 2 * options["target_r"])
    if "total_step" not in options:
        raise ValueError("AdaLoRA schedules its rank budget over the run: give total_step (the number of "
                         "optimizer steps) in its options.")
    return AdaLoraConfig(task_type=task_type, **options)


def _shira(options: dict, task_type: str | None):
    """SHiRA: ``r * (m + n)`` trained entries per targeted linear weight. ``mask_fn`` (not a config field:
    PEFT reads it as an attribute) chooses them — :func:`sparsepeft.shira_mask_fn` for Fisher masks; PEFT's
    random mask otherwise."""
    from peft import ShiraConfig

    options = dict(options)
    mask_fn = options.pop("mask_fn", None)
    options.setdefault("r", 8)
    config = ShiraConfig(task_type=task_type, **options)
    if mask_fn is not None:
        config.mask_fn = mask_fn
    return config


PEFT_BUILDERS: dict[str, Callable[[dict, str | None], Any]] = {
    "lora": _lora_family(),
    "dora": _lora_family(use_dora=True),
    "rslora": _lora_family(use_rslora=True),
    "pissa": _lora_family(init_lora_weights="pissa"),
    "adalora": _adalora,
    "ia3": _simple("IA3Config"),
    "loha": _simple("LoHaConfig", r=8, alpha=8),
    "lokr": _simple("LoKrConfig", r=8, alpha=8),
    "vera": _simple("VeraConfig", r=256),
    "shira": _shira,
}
METHODS = tuple(PEFT_BUILDERS) + tuple(ADAPTER_KINDS)


def infer_peft_task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    return None


def apply_method(model: nn.Module, method: str, options: dict | None = None, task_type: str | None = "auto") -> nn.Module:
    """``model`` with ``method`` added: a ``PeftModel``, or the model itself with bottleneck adapters."""
    method = method.lower()
    options = dict(options or {})
    if method in ADAPTER_KINDS:
        options.setdefault("kind", ADAPTER_KINDS[method])
        return add_bottleneck_adapters(model, BottleneckConfig(**options))
    if method not in PEFT_BUILDERS:
        raise ValueError(f"Unknown PEFT method {method!r}; choose one of {METHODS}.")
    from peft import get_peft_model

    if task_type == "auto":
        task_type = infer_peft_task_type(model)
    try:
        config = PEFT_BUILDERS[method](options, task_type)
    except TypeError as error:
        raise ValueError(f"Bad option for {method}: {error}") from None
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        if "not found" in str(error).lower() or "target modules" in str(error).lower():
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"target_modules {getattr(config, 'target_modules', None)} match no layer of "
                             f"{type(model).__name__}. Its linear layers are named: {names[:12]}.") from error
        raise


def is_tuned(model: nn.Module) -> bool:
    """True when ``model`` carries PEFT modules or bottleneck adapters."""
    if has_bottleneck_adapters(model):
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def tuned_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The FISH-Tuning candidates: every trainable parameter of a PEFT-wrapped / adapter model — the
    parameters the method adds, plus the modules it saves in full (the task head)."""
    if not is_tuned(model):
        raise ValueError(
            f"{type(model).__name__} has no PEFT modules, so there is nothing to mask inside them. Add them first "
            "(peft.get_peft_model, sparsepeft.adapters.add_bottleneck_adapters, or --method lora/adapter in the "
            "CLI), or score the whole model (FISH Mask: --method fish).")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("The PEFT model has no trainable parameter: were its adapters frozen?")
    return params


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reference_count(base_model: nn.Module, method: str, options: dict, defaults: dict | None = None,
                    task_type: str | None = "auto") -> int:
    """Trainable parameters of ``method`` (``defaults`` overridden by ``options``) on ``base_model``'s
    architecture, counted on a meta-device copy: no memory, no initialisation work."""
    base_model = _plain_base(base_model)
    config = getattr(base_model, "config", None)
    with torch.device("meta"):
        if config is not None and hasattr(type(base_model), "_from_config"):
            skeleton = type(base_model)._from_config(copy.deepcopy(config))
        else:
            skeleton = copy.deepcopy(base_model).to("meta")
    merged = {**(defaults or {}), **options}
    merged.pop("mask_fn", None)  # SHiRA's count is r * (m + n) whichever entries are chosen
    if method.lower() == "pissa" or merged.get("init_lora_weights") not in (None, True, False, "gaussian"):
        merged["init_lora_weights"] = True  # the count does not depend on the initialisation (PiSSA needs data)
    tuned = apply_method(skeleton, method, merged, task_type)
    return count_trainable(tuned)


def _plain_base(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
