"""The pieces every experiment is made of: model, task data, features, mask; shared by CLI and benchmarks."""

from __future__ import annotations

import contextlib
import logging
import resource
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..data import DataError, TaskData, load_files, load_glue
from ..data.causal_lm import CAUSAL_LM, PromptResponseTask, load_prompt_response, subset, tokenize_prompt_response
from ..data.features import tokenize_split
from ..data.multiple_choice import MULTIPLE_CHOICE, MultipleChoiceTask, load_multiple_choice, training_features
from ..models.catalog import MINILM_HUB_ID, resolve_model
from ..selection import DEFAULT_ALWAYS_TRAIN, BudgetError, SparseMask, random_mask, select_mask
from ..selection.candidates import candidate_parameters
from ..utils.names import matches_module

logger = logging.getLogger("sparsepeft")

DEFAULT_MODEL = MINILM_HUB_ID
DEMO_DATA = Path(__file__).resolve().parents[1] / "data" / "demo"
METHODS = ("full", "fish", "random")


def load_task_data(
    task: str | None = None,
    data_dir: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    text_columns: Sequence[str] = (),
    label_column: str = "label",
    task_type: str = "auto",
    prompt_column: str = "prompt",
    response_column: str = "response",
    split_seed: int = 0,
) -> TaskData | PromptResponseTask | MultipleChoiceTask:
    """``task`` names a GLUE task (or ``demo``, the packaged sentiment set) or a BIG-bench task folder under
    ``data_dir``; else the user's files (prompt/response pairs for a causal LM when ``task_type`` is
    ``causal-lm``; BIG-bench multiple-choice JSON when it is ``multiple-choice``)."""
    if task and "," in task:
        return _suite(task, data_dir, split_seed)
    bigbench_file = Path(data_dir, task, "task.json") if task and data_dir else None
    if task_type == MULTIPLE_CHOICE or (bigbench_file is not None and bigbench_file.is_file()):
        if bigbench_file is not None and bigbench_file.is_file():
            return load_multiple_choice(bigbench_file, None, split_seed)
        if task or not train_file:
            raise DataError("--task-type multiple-choice reads BIG-bench JSON: give --train-file task.json (split "
                            "into train/validation/test by --split-seed) and optionally --validation-file, or "
                            "--task NAME --data-dir FOLDER with FOLDER/NAME/task.json.")
        return load_multiple_choice(train_file, validation_file, split_seed)
    if task_type == CAUSAL_LM:
        if task or not (train_file and validation_file):
            raise DataError("--task-type causal-lm trains on your prompt/response files: give --train-file and "
                            "--validation-file (JSON lines with 'prompt' and 'response'), not --task.")
        return load_prompt_response(train_file, validation_file, prompt_column, response_column)
    if task == "demo":
        return load_files(DEMO_DATA / "train.tsv", DEMO_DATA / "dev.tsv", ["sentence"], "label", "classification")
    if task:
        return load_glue(task, data_dir)
    if train_file and validation_file:
        return load_files(train_file, validation_file, list(text_columns), label_column, task_type)
    raise DataError("Say what to train on: --task (a GLUE task or 'demo'), or --train-file and --validation-file.")


def _suite(tasks: str, data_dir: str | None, split_seed: int) -> MultipleChoiceTask:
    """``--task a,b,c --data-dir DIR``: BIG-bench tasks DIR/NAME/task.json trained together, reported apart."""
    from ..data.multiple_choice import load_suite
    from ..data.tasks import task_names

    names = task_names(tasks)
    if data_dir is None:
        raise DataError(f"--task {tasks} names several tasks: a suite of BIG-bench tasks, read from --data-dir DIR "
                        "(DIR/NAME/task.json for each).")
    missing = [n for n in names if not Path(data_dir, n, "task.json").is_file()]
    if missing:
        raise DataError(f"--task {tasks}: no {', '.join(str(Path(data_dir, n, 'task.json')) for n in missing)}. A "
                        "suite is BIG-bench tasks, each DIR/NAME/task.json under --data-dir DIR.")
    if len(set(names)) != len(names):
        raise DataError(f"--task {tasks} names a task twice.")
    return load_suite({n: Path(data_dir, n, "task.json") for n in names}, split_seed)


def _from_pretrained(auto_class, path: str, name: str, **kwargs):
    """``auto_class.from_pretrained`` whose hub/IO failures become one clear error (exit 2 in the CLI)."""
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"Could not load --model {name!r}: {reason} It is not a local folder; as a hub id it needs "
                         "the hub (or its cache). Offline, pass a local folder or a short name (minilm, "
                         "smollm2-135m).") from error


def load_model_and_tokenizer(name_or_path: str, task: TaskData | PromptResponseTask,
                             ignore_mismatched_sizes: bool = False):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(name_or_path)
    if isinstance(task, (PromptResponseTask, MultipleChoiceTask)):
        return _load_causal_lm(path, name_or_path)
    label_kwargs: dict[str, Any] = {"num_labels": task.num_labels}
    if task.is_regression:
        label_kwargs["problem_type"] = "regression"
    else:
        label_kwargs["id2label"] = dict(enumerate(task.label_names))
        label_kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    tokenizer = _from_pretrained(AutoTokenizer, path, name_or_path)
    if tokenizer.pad_token is None:  # decoder tokenizers (GPT-2, LLaMA) have none
        tokenizer.pad_token = tokenizer.eos_token
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model, loading = _from_pretrained(AutoModelForSequenceClassification, path, name_or_path,
                                              ignore_mismatched_sizes=ignore_mismatched_sizes,
                                              output_loading_info=True, **label_kwargs)
        except RuntimeError as error:
            if "mismatched" not in str(error):
                raise
            raise ValueError(f"{name_or_path} has a task head of another size than this task's {task.num_labels} "
                             "label(s). Pass --ignore-mismatched-sizes to re-initialise it.") from error
    fresh = sorted(set(loading.get("missing_keys", ())) | {k for k, *_ in loading.get("mismatched_keys", ())})
    if fresh:  # one line instead of transformers' load-report table
        logger.info("New task head for %d label(s): %s initialised at random, trained with the task.",
                    task.num_labels, ", ".join(fresh))
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_causal_lm(path: str, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, path, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _from_pretrained(AutoModelForCausalLM, path, name)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def featurize(task: TaskData | PromptResponseTask, tokenizer, max_length: int, max_train: int | None,
              max_eval: int | None, seed: int):
    """Training features, and per evaluation split the features (or, for multiple choice, the questions)."""
    if isinstance(task, MultipleChoiceTask):
        train = training_features(subset(task.train, max_train, seed), tokenizer, max_length)
        return train, {name: subset(examples, max_eval, seed) for name, examples in task.evaluation.items()}
    if isinstance(task, PromptResponseTask):
        train = tokenize_prompt_response(subset(task.train, max_train, seed), tokenizer, max_length)
        evaluation = {name: tokenize_prompt_response(subset(pairs, max_eval, seed), tokenizer, max_length)
                      for name, pairs in task.evaluation.items()}
        return train, evaluation
    train = tokenize_split(task.train.subset(max_train, seed), tokenizer, max_length, task.is_regression)
    evaluation = {
        name: tokenize_split(split.subset(max_eval, seed), tokenizer, max_length, task.is_regression)
        for name, split in task.evaluation.items()
    }
    return train, evaluation


@dataclass
class MaskRecipe:
    """How to make a mask; one field per CLI flag."""

    method: str = "fish"
    selection: str = "fisher"
    keep_ratio: float = 0.005
    num_samples: int = 1024
    fisher_mode: str = "empirical"
    fisher_batch_size: int = 16
    strategy: str = "global"
    always_train: Sequence[str] = DEFAULT_ALWAYS_TRAIN
    seed: int = 0
    importance: str = "fisher"  # fisher (reference), gradient, taylor or magnitude (importance/scores.py)
    candidates: str = "all"  # all (reference), linear, or module patterns (selection/candidates.py)
    budget: str | None = None  # a Budget spec ("lora:r=8", "74498", "0.5%"); overrides keep_ratio
    fisher_at: str = "init"  # init: at the pretrained weights (reference); warmup: after warm-up steps, undone
    warmup_steps: int = 30
    warmup_lr: float = 5e-5
    warmup_batch_size: int = 16
    ird: Any = None  # an IRDConfig when selection == "ird"
    fisher_groups: Any = None  # lists of parameter names: the Fisher in one pass per group (the same mask)
    autocast_dtype: Any = None  # the Fisher pass under autocast (the training precision)
    timings: dict[str, float] = field(default_factory=dict)
    ird_result: Any = None  # filled by build_mask when selection == "ird"


def build_mask(model, train_features: list[dict], recipe: MaskRecipe, collate_fn,
               model_name: str = "") -> SparseMask | None:
    """The mask for ``recipe.method`` (None for full fine-tuning); time spent is put in ``recipe.timings``.

    Candidates, budget and the warm-up are resolved first, so a spec that cannot be met fails before any pass
    over the data."""
    if recipe.method not in METHODS:
        raise ValueError(f"Unknown method {recipe.method!r}; choose one of {METHODS}.")
    if recipe.method == "full":
        return None
    start = time.perf_counter()
    candidates, budget = resolve_selection(model, recipe)
    variant = {"importance": recipe.importance, "candidates": recipe.candidates, "fisher_at": recipe.fisher_at,
               **({"budget_spec": recipe.budget} if recipe.budget else {})}
    if recipe.selection == "ird" and recipe.method != "random":
        from ..selection.ird import IRDConfig, ird_search

        result = ird_search(model, train_features, recipe.keep_ratio, recipe.ird or IRDConfig(seed=recipe.seed),
                            collate_fn=collate_fn)
        recipe.ird_result = result
        recipe.timings["fisher_seconds"] = result.seconds
        mask = result.mask
        mask.config["ird_report"] = result.report()
    elif recipe.method == "random" or recipe.selection == "random":
        mask = random_mask(model, recipe.keep_ratio, params=list(candidates), strategy=recipe.strategy,
                           always_train=recipe.always_train, seed=recipe.seed, budget=budget)
        mask.config.update(candidates=recipe.candidates, **({"budget_spec": recipe.budget} if recipe.budget else {}))
    else:
        info = {"selection": recipe.selection, "fisher_mode": recipe.fisher_mode,
                "num_samples": min(recipe.num_samples, len(train_features)), "seed": recipe.seed, **variant}
        with _warmed_up(model, train_features, candidates, recipe, collate_fn) as warmup:
            if warmup is not None:
                info["warmup"] = warmup
            mask = _scored_mask(model, train_features, recipe, collate_fn, candidates, budget, info)
        recipe.timings["fisher_seconds"] = time.perf_counter() - start
    mask.config["model"] = model_name
    recipe.timings["mask_seconds"] = time.perf_counter() - start
    return mask


def resolve_selection(model, recipe: MaskRecipe) -> tuple[dict, int | None]:
    """The candidate tensors and the budget in entries (None: by ``keep_ratio``), or the error that says why the
    recipe cannot be met on this model — cheap, so callers run it before any pass over the data."""
    check_recipe(recipe)
    candidates = candidate_parameters(model, recipe.candidates, recipe.always_train)
    return candidates, resolve_budget(model, recipe, sum(p.numel() for p in candidates.values()))


def check_recipe(recipe: MaskRecipe) -> None:
    """The combinations a mask cannot be made with, before anything is loaded or measured."""
    from ..importance.scores import IMPORTANCES

    if recipe.importance not in IMPORTANCES:
        raise ValueError(f"Unknown importance {recipe.importance!r}: use one of {', '.join(IMPORTANCES)}.")
    if recipe.fisher_at not in ("init", "warmup"):
        raise ValueError(f"Unknown --fisher-at {recipe.fisher_at!r}: use init or warmup.")
    random = recipe.method == "random" or recipe.selection == "random"
    if recipe.fisher_at == "warmup" and (random or recipe.importance == "magnitude"):
        what = "a random mask" if random else "--importance magnitude"
        raise ValueError(f"--fisher-at warmup warms the model up before its scores are measured, but {what} measures "
                         "nothing on the data: drop --fisher-at warmup.")
    if recipe.fisher_at == "warmup" and recipe.warmup_steps < 1:
        raise ValueError("--fisher-at warmup needs --fisher-warmup-steps >= 1 (0 warms nothing up): raise it, or use "
                         "--fisher-at init.")
    if recipe.selection == "ird" and not random and (recipe.importance != "fisher" or recipe.candidates != "all"
                                                      or recipe.budget or recipe.fisher_at != "init"):
        raise ValueError("--selection ird narrows its own samples and parameter range from the Fisher over every "
                         "weight: it does not combine with --importance, --candidates, --budget or --fisher-at warmup.")


def resolve_budget(model, recipe: MaskRecipe, num_candidates: int) -> int | None:
    """Entries to keep by ``recipe.budget`` (a count, a ratio of the candidates, or the trainable count of a
    reference PEFT config on this model, e.g. ``lora:r=8``); None: ``recipe.keep_ratio`` decides."""
    if not recipe.budget:
        return None
    from ..models.peft import reference_count
    from ..selection import Budget

    try:
        count = Budget.parse(recipe.budget).resolve(
            num_candidates, lambda method, options: reference_count(model, method, options))
    except BudgetError as error:
        raise BudgetError(f"--budget {recipe.budget}: {error} For a full-model mask the candidates are --candidates "
                          f"{recipe.candidates!r} ({num_candidates} entries): lower the budget or widen them."
                          ) from None
    forced = sum(p.numel() for n, p in model.named_parameters() if matches_module(n, recipe.always_train))
    if count < forced:
        raise BudgetError(f"--budget {recipe.budget} = {count} entries is smaller than the always-trained modules' "
                          f"{forced} entries, which count inside it: raise the budget or change --always-train.")
    return count


@contextlib.contextmanager
def _warmed_up(model, data, candidates: dict, recipe: MaskRecipe, collate_fn):
    """Inside: the candidates after ``recipe.warmup_steps`` dense steps (undone on exit), or the model as it is."""
    if recipe.fisher_at != "warmup":
        yield None
        return
    from ..importance.warmup import dense_warmup

    with dense_warmup(model, data, candidates, steps=recipe.warmup_steps, lr=recipe.warmup_lr,
                      batch_size=recipe.warmup_batch_size, collate_fn=collate_fn, seed=recipe.seed) as report:
        yield {**report, "lr": recipe.warmup_lr}


def _scored_mask(model, data, recipe: MaskRecipe, collate_fn, candidates: dict, budget: int | None,
                 info: dict) -> SparseMask:
    """Score the candidates by ``recipe.importance`` and select; a Fisher planned in groups is measured one
    group at a time (the same mask)."""
    from ..importance.scores import importance_scores

    groups = [[item for item in group if (item if isinstance(item, str) else item[0]) in candidates]
              for group in (recipe.fisher_groups or [])]
    groups = [group for group in groups if group]
    if recipe.importance == "fisher" and len(groups) > 1:
        from ..selection.grouped import grouped_fisher_mask

        return grouped_fisher_mask(
            model, data, groups, recipe.keep_ratio, strategy=recipe.strategy, always_train=recipe.always_train,
            lowest=recipe.selection == "lowest", config=info, budget=budget, num_samples=recipe.num_samples,
            mode=recipe.fisher_mode, batch_size=recipe.fisher_batch_size, collate_fn=collate_fn, seed=recipe.seed,
            autocast_dtype=recipe.autocast_dtype)
    scores = importance_scores(model, data, recipe.importance, recipe.num_samples, recipe.fisher_batch_size,
                               params=list(candidates), collate_fn=collate_fn, seed=recipe.seed,
                               autocast_dtype=recipe.autocast_dtype, fisher_mode=recipe.fisher_mode)
    if recipe.selection == "lowest":
        scores = {n: f.neg_() for n, f in scores.items()}
    return select_mask(scores, recipe.keep_ratio, strategy=recipe.strategy, always_train=recipe.always_train,
                       model=model, config=info, budget=budget)


class PeakMemory:
    """Peak resident memory of a phase of this process (Linux resets the high-water mark on request).

    ``ru_maxrss`` alone only knows the whole process's peak, which would charge the Fisher pass's peak
    to training and the first method's peak to the second.
    """

    def __init__(self):
        self.resettable = self._reset()

    @staticmethod
    def _reset() -> bool:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def read_mb(self) -> dict[str, float]:
        peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.resettable:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith("VmHWM:"):
                        peak["peak_rss_mb"] = int(line.split()[1]) / 1024
        if torch.cuda.is_available():
            peak["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return peak
