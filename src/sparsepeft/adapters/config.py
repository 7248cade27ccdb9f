"""``BottleneckConfig``: where bottleneck adapters go and what they look like; serialises to JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

KINDS = ("series", "pfeiffer", "parallel")
DEFAULT_LOCATIONS = {"series": ("attention", "ffn"), "pfeiffer": ("ffn",), "parallel": ("ffn",)}
CONFIG_NAME = "adapter_config.json"


@dataclass
class BottleneckConfig:
    """Bottleneck adapters ``x -> up(act(down(x))) * scaling`` added to transformer sublayers.

    ``series`` (Houlsby et al. 2019): after the attention and the feed-forward output projections, on
    their output, before the residual. ``pfeiffer`` (Pfeiffer et al. 2021): the same, after the
    feed-forward sublayer only. ``parallel`` (He et al. 2022): reads the sublayer's *input* and adds to its
    output, beside the sublayer (feed-forward by default).
    """

    kind: str = field(default="series", metadata={"help": "series (Houlsby), pfeiffer, or parallel."})
    bottleneck_size: int = field(default=64, metadata={"help": "Width of the bottleneck."})
    non_linearity: str = field(default="relu", metadata={"help": "Activation between down and up (transformers ACT2FN name)."})
    scaling: float = field(default=1.0, metadata={"help": "Multiplies the adapter's output."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input while training."})
    locations: Optional[list[str]] = field(default=None, metadata={
        "help": "Sublayers that get an adapter: attention and/or ffn. Default: both for series, ffn otherwise."})
    init_std: float = field(default=1e-2, metadata={"help": "Std of the down projection's initial weights."})
    zero_init_up: bool = field(default=True, metadata={
        "help": "Initialise the up projection to zero, so the adapted model starts as the base model."})
    blocks_path: Optional[str] = field(default=None, metadata={
        "help": "Dotted path of the ModuleList of transformer blocks, for models where it is not found."})
    module_names: Optional[dict[str, str]] = field(default=None, metadata={
        "help": "Sublayer module names inside a block, for unusual models: attention_input, attention_output, "
                "ffn_input, ffn_output (e.g. {'ffn_output': 'mlp.down_proj', 'ffn_input': 'mlp'})."})
    modules_to_save: list[str] = field(default_factory=lambda: ["classifier", "score"], metadata={
        "help": "Modules outside the blocks trained in full and saved with the adapters (the task head)."})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown adapter kind {self.kind!r}: choose one of {KINDS}.")
        if self.bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be at least 1, got {self.bottleneck_size}.")
        if self.locations is None:
            self.locations = list(DEFAULT_LOCATIONS[self.kind])
        bad = [loc for loc in self.locations if loc not in ("attention", "ffn")]
        if bad or not self.locations:
            raise ValueError(f"Adapter locations must be a non-empty subset of ['attention', 'ffn'], got {self.locations}.")

    def to_dict(self) -> dict:
        return {"peft_type": "SPARSEPEFT_BOTTLENECK", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "BottleneckConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "BottleneckConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: not a folder written by save_bottleneck_adapters.")
        return cls.from_dict(json.loads(path.read_text()))
