"""One object that owns every hook needed to capture per-sample gradients in a single backward pass.

Forward hooks keep each covered layer's input; a tensor hook on the layer's output receives the output
gradient and hands (layer, input, output-gradient) to the layer's rule. Parameters are *frozen* while
capturing: the backward pass then computes activation gradients only, and the per-sample rules replace
the ordinary weight-gradient work — which is why a Fisher pass costs about one training pass.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from .rules import PerSampleGrads, find_rule
from .rules.registry import ForwardContext

GradSink = Callable[[str, PerSampleGrads], None]


class PerSampleGradCapture:
    """Attach to ``model``; every backward then streams per-sample gradients of ``scored`` into a sink.

    ``scored`` maps parameter names to parameters. Those owned by a layer with a rule are *covered*;
    the rest are listed in :attr:`uncovered` for the caller's exact fallback.
    """

    def __init__(self, model: nn.Module, scored: dict[str, nn.Parameter]):
        self.model = model
        names_by_id = {id(p): n for n, p in scored.items()}
        self._layers: list[tuple[nn.Module, Callable, dict[str, str]]] = []
        covered: set[str] = set()
        for _, module in model.named_modules():
            local = {ln: names_by_id[id(p)] for ln, p in module.named_parameters(recurse=False) if id(p) in names_by_id}
            rule = find_rule(module) if local else None
            if rule is not None:
                self._layers.append((module, rule, local))
                covered.update(local.values())
        self.uncovered = [n for n in scored if n not in covered]
        self.use_counts: dict[str, int] = defaultdict(int)
        self.not_covered_at_runtime: set[str] = set()
        self.ever_used: set[str] = set()  # over the whole pass; use_counts is per batch
        self._handles: list = []
        self._leaves: list[torch.Tensor] = []
        self._sink: GradSink | None = None
        self.batch_size = 0

    @property
    def covered(self) -> list[str]:
        return [name for _, _, local in self._layers for name in local.values()]

    def attach(self, sink: GradSink) -> "PerSampleGradCapture":
        if self._handles:
            raise RuntimeError("PerSampleGradCapture is already attached; detach it before attaching again.")
        self._sink = sink
        for module, rule, local in self._layers:
            if isinstance(module, nn.Embedding):
                self._handles.append(module.register_forward_pre_hook(self._expand_shared_input))
            with_kwargs = getattr(rule, "needs_context", False)
            self._handles.append(
                module.register_forward_hook(self._make_forward_hook(rule, local, with_kwargs), with_kwargs=with_kwargs))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sink = None

    def start_batch(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.use_counts.clear()
        self._leaves.clear()

    @property
    def leaves(self) -> list[torch.Tensor]:
        """Layer outputs that had to be made to require grad; backward only needs to reach these."""
        return self._leaves

    def _expand_shared_input(self, module, inputs):
        """Position ids come as ``[1, T]`` and are broadcast over the batch *after* the lookup, which
        sums the samples' gradients together; looking them up per sample keeps them apart."""
        ids = inputs[0] if inputs else None
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1 and ids.shape[0] == 1 and self.batch_size > 1:
            return (ids.expand(self.batch_size, *ids.shape[1:]), *inputs[1:])
        return None

    def _make_forward_hook(self, rule, local: dict[str, str], with_kwargs: bool):
        def forward_hook(module, inputs, *rest):
            kwargs, output = rest if with_kwargs else ({}, rest[0])
            if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
                return None
            if not torch.is_grad_enabled():
                return None
            if output.dim() > 0 and output.shape[0] == self.batch_size:
                # a call on something else than the batch (DoRA runs lora_A on an identity matrix to get
                # its weight, then detaches it) is judged when and if a gradient reaches it
                for name in local.values():
                    self.use_counts[name] += 1
                    self.ever_used.add(name)
            activation = inputs[0].detach()
            context = ForwardContext(inputs=tuple(inputs), kwargs=dict(kwargs)) if with_kwargs else None
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
                self._leaves.append(output)
            output.register_hook(lambda grad: self._on_output_grad(module, rule, local, activation, grad, context))
            return output

        return forward_hook

    def _on_output_grad(self, module, rule, local, activation, grad_output, context) -> None:
        if grad_output.dim() == 0 or grad_output.shape[0] != self.batch_size:
            # the layer saw something shared by the whole batch: per-sample grads cannot be split here
            self.not_covered_at_runtime.update(local.values())
            return
        grads = rule(module, activation, grad_output) if context is None else rule(module, activation, grad_output, context)
        if grads is None:
            self.not_covered_at_runtime.update(local.values())
            return
        for local_name, per_sample in grads.items():
            if local_name in local:
                self._sink(local[local_name], per_sample)
