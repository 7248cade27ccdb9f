"""Rules for the layers PEFT adds that are not plain ``nn.Linear`` (LoRA's A and B are, and need none).

DoRA's magnitude vector ``m`` scales each output row of the adapted weight: the layer returns
``(m / ||W + s·BA||_row - 1) · W x + (m / ||W + s·BA||_row) · s·B A x`` with the norm detached (DoRA §4.3,
as PEFT implements it), so for one sample ``dL/dm = sum_t g_t ⊙ (W x_t + s·B A x_t) / ||W + s·BA||_row``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import DenseGrads, ForwardContext, as_sequence, register_rule, upcast


@register_rule("DoraLinearLayer", context=True)
def dora_magnitude_rule(layer, activation: torch.Tensor, grad_output: torch.Tensor, context: ForwardContext):
    kwargs = context.kwargs
    lora_A, lora_B, base_layer = kwargs.get("lora_A"), kwargs.get("lora_B"), kwargs.get("base_layer")
    weight = getattr(base_layer, "weight", None)
    if lora_A is None or lora_B is None or weight is None or weight.dim() != 2 or weight.dtype not in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None  # quantised or unusual base layer: the exact fallback scores it
    scaling = kwargs.get("scaling", 1.0)
    batch = grad_output.shape[0]
    with torch.no_grad():
        w = upcast(weight.t() if layer.fan_in_fan_out else weight)
        a, b = upcast(lora_A.weight), upcast(lora_B.weight)
        row_norm = torch.linalg.norm(w + scaling * (b @ a), dim=1)
        x = upcast(as_sequence(activation, batch))
        direction = (F.linear(x, w) + scaling * F.linear(F.linear(x, a), b)) / row_norm
        per_sample = (upcast(as_sequence(grad_output, batch)) * direction).sum(dim=1)
    return {"weight": DenseGrads(per_sample)}
