"""``sparsepeft train`` and ``sparsepeft mask``: the example-script recipes, written out."""

from __future__ import annotations

import logging
import contextlib
import math
import os
import time
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed

from ..data import compute_metrics
from ..data.collate import causal_lm_collator
from ..data.causal_lm import PromptResponseTask, exact_match_metrics, greedy_predictions
from ..data.multiple_choice import MultipleChoiceTask, choice_metrics_by_task, option_log_likelihoods
from ..data.sampling import check_shuffle_length_groups, task_curriculum_warning, train_order
from ..importance.memory import plan_fisher_batch
from ..experiments.pipeline import (PeakMemory, build_mask, check_recipe, featurize, load_model_and_tokenizer,
                                    load_task_data, resolve_selection)
from ..engines import apply_delta, optimizer_state_bytes, read_delta
from ..adapters import has_bottleneck_adapters, save_bottleneck_adapters
from ..integrations import (DELTA_FILE, MASK_FILE, LayerwiseCallback, SparseMaskCallback, SparseTrainer,
                           mask_from_checkpoint)
from ..models.peft import apply_method, count_trainable, reference_count
from ..selection import SparseMask
from ..selection.mask import embedding_rows, embedding_rows_line
from ..selection.fish_tuning import fish_tuning_mask
from ..selection.shira import shira_adapter_mask, shira_mask_fn
from ..utils.io import write_json
from ..integrations.guard import NonFiniteGuard
from .output import prepare_output_dir
from .arguments import DataArguments, LayerwiseArguments, ModelArguments, PeftArguments, SparseArguments, in_flag_names

logger = logging.getLogger("sparsepeft")


def _prepare(model_args: ModelArguments, data_args: DataArguments, sparse_args: SparseArguments, seed: int):
    task = load_task_data(data_args.task, data_args.data_dir, data_args.train_file, data_args.validation_file,
                          [c for c in data_args.text_columns.split(",") if c], data_args.label_column,
                          data_args.task_type, data_args.prompt_column, data_args.response_column,
                          data_args.split_seed)
    model, tokenizer = load_model_and_tokenizer(model_args.model, task, model_args.ignore_mismatched_sizes)
    train, evaluation = featurize(task, tokenizer, model_args.max_seq_length, data_args.max_train_samples,
                                  data_args.max_eval_samples, seed)
    return task, model, tokenizer, train, evaluation


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _training_autocast(training_args) -> torch.dtype | None:
    return _AUTOCAST["bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"]


def _mask_autocast(sparse_args: SparseArguments, training_args) -> torch.dtype | None:
    """The autocast dtype of the mask phase: the training precision unless --fisher-precision says otherwise."""
    if sparse_args.fisher_precision == "auto":
        return _training_autocast(training_args)
    return _AUTOCAST[sparse_args.fisher_precision]


def _autocast(model, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype)


def _needs_fisher(sparse_args: SparseArguments, peft_args: PeftArguments) -> bool:
    if sparse_args.mask_file or sparse_args.method == "full" or sparse_args.random_entries:
        return False
    if sparse_args.importance == "magnitude" and not sparse_args.is_peft:
        return False  # |w| reads no data
    return not sparse_args.is_peft or peft_args.fish or sparse_args.method == "shira"


def _plan_fisher_batch(model, train, collate, sparse_args: SparseArguments, training_args, autocast):
    """Unless --fisher-batch-size is given, the largest Fisher batch (and, if the accumulator needs it, the groups
    of tensors measured one pass each) that keeps the mask phase within a training step's memory (see
    sparsepeft.importance.memory); the plan goes into results.json."""
    if sparse_args.fisher_batch_size is not None:
        return None
    scored = {n: p for n, p in model.named_parameters() if p.requires_grad}
    plan = plan_fisher_batch(model, train, collate, training_args.per_device_train_batch_size, scored,
                             train_autocast=_training_autocast(training_args),
                             fisher_autocast=autocast)
    sparse_args.fisher_batch_size = plan.batch_size
    logger.info("Fisher batch %d: %.1f MB of activations per sample, a %.0f MB accumulator, within a training "
                "batch of %d.", plan.batch_size, plan.fisher_activation_bytes_per_sample / 2**20,
                plan.accumulator_bytes / 2**20, plan.train_batch_size)
    return plan


def _recipe(sparse_args: SparseArguments, peft_args: PeftArguments, training_args, plan, autocast):
    recipe = peft_args.full_model_recipe(sparse_args.recipe(training_args.seed),
                                         training_args.per_device_train_batch_size)
    recipe.autocast_dtype = autocast
    if plan is not None and len(plan.groups) > 1 and sparse_args.selection in ("fisher", "lowest"):
        recipe.fisher_groups = plan.groups
    return recipe


def _mask_phase(model, train, collate, sparse_args: SparseArguments, peft_args: PeftArguments, training_args,
                model_name: str, mask: SparseMask | None = None):
    """Plan the Fisher batch, add the PEFT method and make the mask, in the training precision, on the device the
    model is on. FISH-Tuning scores the adapter, so its plan follows the PEFT method; every other Fisher (FISH,
    IRD, SHiRA's, inside the PEFT step) is planned on the model as loaded. A ``mask`` (from a checkpoint) is kept.
    Returns (model, method options, mask, recipe, plan, autocast dtype)."""
    autocast = _mask_autocast(sparse_args, training_args)
    if mask is None and not sparse_args.mask_file and sparse_args.method in ("fish", "random"):
        resolve_selection(model, _recipe(sparse_args, peft_args, training_args, None, autocast))  # before any pass
    fisher = mask is None and _needs_fisher(sparse_args, peft_args)
    scores_adapter = sparse_args.is_peft and sparse_args.method != "shira"
    plan = _plan_fisher_batch(model, train, collate, sparse_args, training_args, autocast) \
        if fisher and not scores_adapter else None
    recipe = _recipe(sparse_args, peft_args, training_args, plan, autocast)
    with _autocast(model, autocast):
        model, options = _tune(model, sparse_args, peft_args, training_args, len(train), train, collate, recipe)
    if fisher and scores_adapter:
        plan = _plan_fisher_batch(model, train, collate, sparse_args, training_args, autocast)
    if mask is None:
        with _autocast(model, autocast):
            mask = _make_mask(model, collate, train, sparse_args, peft_args, recipe, model_name, options,
                              training_args.seed)
    return model, options, mask, recipe, plan, autocast


def _mask_phase_report(device: torch.device, autocast, peak: dict, plan) -> dict:
    return {"device": str(device), "precision": str(autocast).replace("torch.", "") if autocast else "float32",
            **{k: round(v, 1) for k, v in peak.items()}, "fisher_batch_plan": plan.to_dict() if plan else None}


def _check_combination(sparse_args: SparseArguments, peft_args: PeftArguments,
                       layer_args: LayerwiseArguments | None = None) -> None:
    if layer_args is not None and layer_args.layers is not None and sparse_args.method in ("fish", "random"):
        raise ValueError(f"--layers chooses blocks of a PEFT method (--method lora/dora/adapter/...; add --fish for a "
                         f"FISH-Tuning mask inside it) or of the whole model (--method full, LISA's own form), not of "
                         f"--method {sparse_args.method}.")
    if peft_args.fish and not sparse_args.is_peft:
        raise ValueError("--fish masks inside a PEFT method (--method lora/dora/adapter/...). For a Fisher mask over "
                         "the whole model use --method fish without --fish.")
    if sparse_args.method == "shira" and peft_args.fish:
        raise ValueError("--method shira is already a sparse adapter: drop --fish (choose its entries with "
                         "--selection fisher|random).")
    if sparse_args.method == "shira" and sparse_args.selection not in ("fisher", "random"):
        raise ValueError("--method shira chooses its entries by --selection fisher (each layer's top r(m+n) by the "
                         f"base model's Fisher) or random (PEFT's draw), not --selection {sparse_args.selection}.")
    full_model_only = [flag for flag, given in (("--importance", sparse_args.importance != "fisher"),
                                                 ("--candidates", sparse_args.candidates != "all")) if given]
    if full_model_only and sparse_args.method not in ("fish", "random"):
        raise ValueError(f"{' and '.join(full_model_only)} choose the entries of a full-model mask (--method fish or "
                         f"random), not of --method {sparse_args.method}: drop {' and '.join(full_model_only)}.")
    if sparse_args.method == "full" and (peft_args.budget or peft_args.fisher_at):
        raise ValueError("--method full trains every weight: --budget and --fisher-at belong to a mask (--method fish, "
                         "random, or a PEFT method with --fish).")
    if sparse_args.method in ("fish", "random"):
        try:  # importance, warm-up, budget and IRD combinations: checked before anything is loaded
            check_recipe(peft_args.full_model_recipe(sparse_args.recipe(0), 1))
        except ValueError as error:
            raise in_flag_names(error) from None
    if sparse_args.reselect_every and (sparse_args.method not in ("fish", "random") or sparse_args.engine != "sparse"):
        raise ValueError("--reselect-every re-selects the entries of a full-model mask on the sparse engine (--method "
                         f"fish or random, --engine sparse), not of --method {sparse_args.method} with --engine "
                         f"{sparse_args.engine}: drop --reselect-every, or change the method or engine.")
    if sparse_args.is_peft and peft_args.fish and sparse_args.engine == "sparse":
        raise ValueError("--engine sparse stores value vectors of full-model masks; a PEFT adapter is already small, "
                         "so FISH-Tuning trains with --engine dense-mask (its optimizer state is the adapter's).")


def _total_steps(training_args: TrainingArguments, num_train: int) -> int:
    if training_args.max_steps and training_args.max_steps > 0:
        return training_args.max_steps
    per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    return max(1, math.ceil(num_train / per_step) * math.ceil(training_args.num_train_epochs))


def _tune(model, sparse_args: SparseArguments, peft_args: PeftArguments, training_args, num_train: int,
          train=None, collate=None, recipe=None):
    """Add the PEFT method (if one is asked for); returns (model, the method's options)."""
    if not sparse_args.is_peft:
        return model, {}
    options = peft_args.method_options(sparse_args.method, _total_steps(training_args, num_train))
    if sparse_args.method == "shira":
        options = _shira_selection(model, options, sparse_args, training_args.seed, train, collate, recipe)
    return apply_method(model, sparse_args.method, options), options


def _shira_selection(model, options: dict, sparse_args: SparseArguments, seed: int, train, collate, recipe) -> dict:
    """SHiRA's entries: the top r(m+n) of each layer by the base model's Fisher, or PEFT's random draw."""
    if sparse_args.selection == "random":
        return {**options, "random_seed": seed}
    start = time.perf_counter()
    mask_fn = shira_mask_fn(model, train, target_modules=options.get("target_modules"),
                            num_samples=sparse_args.num_samples, mode=sparse_args.fisher_mode,
                            batch_size=sparse_args.fisher_batch_size, collate_fn=collate, seed=seed)
    if recipe is not None:
        recipe.timings["fisher_seconds"] = recipe.timings["mask_seconds"] = time.perf_counter() - start
    return {**options, "mask_fn": mask_fn}


def _collator(task, tokenizer, model):
    """Causal-LM examples carry label sequences, which the tokenizer's padding collator cannot pad; where
    the model can, their logits are computed at the answer positions only (same loss, less work)."""
    if isinstance(task, (PromptResponseTask, MultipleChoiceTask)):
        return causal_lm_collator(model, tokenizer.pad_token_id)
    return DataCollatorWithPadding(tokenizer)


def _make_mask(model, collate, train, sparse_args: SparseArguments, peft_args: PeftArguments, recipe,
               model_name: str, options: dict, seed: int):
    if sparse_args.mask_file:
        mask = SparseMask.load(sparse_args.mask_file)
        mask.check_compatible(model)
        return mask
    if not sparse_args.is_peft:
        return build_mask(model, train, recipe, collate, model_name=model_name)
    if not peft_args.fish:
        return None  # the vanilla PEFT method
    counter = lambda method, overrides: reference_count(model, method, overrides, defaults=options)  # noqa: E731
    mask = fish_tuning_mask(model, train, peft_args.fish_config(sparse_args, seed), collate_fn=collate,
                            reference_count=counter)
    mask.config.update(model=model_name, method=sparse_args.method, method_options=options)
    recipe.timings["mask_seconds"] = mask.config["mask_seconds"]
    return mask


class AdaLoraAllocationCallback(TrainerCallback):
    """AdaLoRA reallocates its ranks from the gradients after every optimizer step (Trainer does not)."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


def _save_mask(mask: SparseMask, output_dir: Path) -> None:
    mask.save(output_dir / MASK_FILE)
    mask.plot(output_dir / "mask_density.png")
    report = mask.config.get("ird_report")
    if report is not None:  # IRD: the rounds, as JSON and as a plot
        from ..selection.plot import plot_ird_rounds

        write_json(output_dir / "ird_report.json", report)
        plot_ird_rounds(report, output_dir / "ird_rounds.png")


def run_mask(model_args, data_args, sparse_args, training_args: TrainingArguments,
             peft_args: PeftArguments | None = None) -> dict:
    """Compute and save a mask only (``sparse_mask.safetensors``, density plot, ``mask_summary.json``)."""
    peft_args = peft_args or PeftArguments()
    if sparse_args.method == "full" or (sparse_args.is_peft and not peft_args.fish):
        raise ValueError("`sparsepeft mask` makes a mask: use --method fish or random, or a PEFT method with --fish.")
    _check_combination(sparse_args, peft_args)
    prepare_output_dir(training_args.output_dir, model_args.overwrite_output_dir, None)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    task, model, tokenizer, train, _ = _prepare(model_args, data_args, sparse_args, training_args.seed)
    model.to(training_args.device)  # the mask phase runs where training would (--use-cpu; each rank's own GPU)
    collate = _collator(task, tokenizer, model)
    mask_phase = PeakMemory()
    model, options, mask, recipe, plan, autocast = _mask_phase(model, train, collate, sparse_args, peft_args,
                                                               training_args, model_args.model)
    if training_args.process_index == 0:  # every rank holds the same mask (checked); one writes it
        _save_mask(mask, output_dir)
    summary = {"task": task.name, "model": model_args.model, **recipe.timings,
               "mask_phase": _mask_phase_report(training_args.device, autocast, mask_phase.read_mb(), plan),
               **mask.summary(), "embedding_rows": embedding_rows(mask, model, tokenizer)}
    if training_args.process_index == 0:
        write_json(output_dir / "mask_summary.json", summary)
    logger.info("Saved a mask of %d entries (%.4f%%) to %s", mask.num_selected, 100 * mask.density, output_dir)
    return summary


def run_train(model_args, data_args, sparse_args, training_args: TrainingArguments,
              peft_args: PeftArguments | None = None, layer_args: LayerwiseArguments | None = None) -> dict:
    """Fine-tune with the chosen method, evaluate on every dev split, write model, mask and results.json."""
    peft_args = peft_args or PeftArguments()
    layer_args = layer_args or LayerwiseArguments()
    _check_combination(sparse_args, peft_args, layer_args)
    if sparse_args.reselect_every and training_args.world_size > 1:
        raise ValueError("--reselect-every is not supported under DDP yet (each process would choose candidates from "
                         "its own gradients): train on one process, or drop --reselect-every.")
    if sparse_args.reselect_every and training_args.fp16:
        raise ValueError("--reselect-every scores candidates on the gradients as the backward produces them, which "
                         "--fp16 scales by the loss scale: use --bf16 (or float32), or drop --reselect-every.")
    check_shuffle_length_groups(data_args.shuffle_length_groups, training_args)  # before anything is written
    curriculum = task_curriculum_warning(data_args.task, training_args, data_args.shuffle_length_groups)
    if curriculum:
        logger.warning(curriculum)
    prepare_output_dir(training_args.output_dir, model_args.overwrite_output_dir,
                       training_args.resume_from_checkpoint)
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    task, model, tokenizer, train, evaluation = _prepare(model_args, data_args, sparse_args, training_args.seed)
    eval_during_training = _validation_during_training(task, evaluation, training_args)
    total_params = sum(p.numel() for p in model.parameters())
    model.to(training_args.device)  # the mask phase runs where training will (--use-cpu; each rank's own GPU)
    collate = _collator(task, tokenizer, model)
    resume = training_args.resume_from_checkpoint
    saved = mask_from_checkpoint(resume) if resume and os.path.isdir(resume) else None
    mask_phase = PeakMemory()
    model, options, mask, recipe, plan, autocast = _mask_phase(model, train, collate, sparse_args, peft_args,
                                                               training_args, model_args.model, saved)
    if saved is not None:
        mask.check_compatible(model)
        logger.info("Resuming with the mask saved in %s", resume)
        saved_ratio = mask.config.get("keep_ratio")
        if saved_ratio is not None and not sparse_args.is_peft and abs(saved_ratio - sparse_args.keep_ratio) > 1e-12:
            logger.warning("The checkpoint's mask keeps %.4g of the weights; --keep-ratio %.4g does not apply to a "
                           "resumed run (start a new run for another ratio).", saved_ratio, sparse_args.keep_ratio)
    mask_peak = mask_phase.read_mb()
    if mask is not None and sparse_args.reselection_config() is not None:
        mask.config["reselection"] = sparse_args.reselection_config().to_dict()
    if mask is not None:
        logger.info("Selection: %s", mask.variant_line())
        logger.info("Mask: %s", mask.allocation_line())
    rows = embedding_rows(mask, model, tokenizer) if mask is not None else None
    if rows is not None:
        logger.info("Embedding rows: %s", embedding_rows_line(rows))
    shira_entries = shira_adapter_mask(model) if sparse_args.method == "shira" else None
    if shira_entries is not None:
        logger.info("SHiRA entries: %s", shira_entries.allocation_line())
    if mask is not None and training_args.process_index == 0:
        _save_mask(mask, output_dir)

    causal = isinstance(task, PromptResponseTask)

    def metrics_fn(prediction):
        if causal:
            return exact_match_metrics(prediction.predictions, prediction.label_ids)
        return compute_metrics(task.metrics, prediction.predictions, prediction.label_ids)

    peft_params = count_trainable(model) if sparse_args.is_peft else None  # before the mask freezes anything
    callback = SparseMaskCallback(mask, engine=sparse_args.engine, reselection=sparse_args.reselection_config()
                                  ) if mask is not None else None
    callbacks = ([callback] if callback is not None else []) + [NonFiniteGuard()]
    if sparse_args.method == "adalora" and mask is None:
        callbacks.append(AdaLoraAllocationCallback(model))  # with --fish the mask is the allocation
    layer_config = layer_args.config(training_args.seed)
    layerwise = LayerwiseCallback(layer_config, probe_data=train, collate_fn=collate) if layer_config else None
    if layerwise is not None:
        callbacks.append(layerwise)  # after the mask's callback: it manages what the mask left trainable
    trainer = SparseTrainer(  # delta-only checkpoints under the sparse engine
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=eval_during_training,
        data_collator=collate,
        processing_class=tokenizer,
        compute_metrics=metrics_fn,
        preprocess_logits_for_metrics=greedy_predictions if causal else None,
        callbacks=callbacks,
        shuffle_length_groups=data_args.shuffle_length_groups,
    )
    evaluate_only = training_args.max_steps == 0  # --max-steps 0: the model as it is (a zero-shot floor)
    trainable = 0 if evaluate_only else mask.num_selected if mask is not None else count_trainable(model)
    train_phase = PeakMemory()
    start = time.perf_counter()
    if evaluate_only:
        train_output = None
    else:
        train_output = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start
    train_peak = train_phase.read_mb()
    eval_start = time.perf_counter()
    metrics = {}
    option_scores = {}  # per question of each split: what a paired comparison of two runs needs
    for split, features in evaluation.items():
        if isinstance(task, MultipleChoiceTask):
            option_scores[split] = option_log_likelihoods(model, tokenizer, features, model_args.max_seq_length,
                                                          training_args.per_device_eval_batch_size)
            metrics[split] = choice_metrics_by_task(features, option_scores[split])
            continue
        scores = trainer.evaluate(features, metric_key_prefix=split)
        metrics[split] = {k[len(split) + 1 :]: v for k, v in scores.items()
                          if k.startswith(f"{split}_") and not k.endswith(("runtime", "per_second"))}
    eval_seconds = time.perf_counter() - eval_start
    if evaluate_only:
        pass  # nothing trained: no copy of the input model is written
    elif has_bottleneck_adapters(model):
        if trainer.is_world_process_zero():
            save_bottleneck_adapters(model, output_dir)  # adapters + head only; the base checkpoint holds the rest
            tokenizer.save_pretrained(output_dir)
    else:  # a PEFT adapter (PEFT's format) or a plain dense model: the callback detached its engine at train end
        trainer.save_model(str(output_dir))
    if mask is not None and "reselection" in callback.stats:  # the mask the run ended with, and its rows
        rows = embedding_rows(mask, model, tokenizer)
        if trainer.is_world_process_zero():
            _save_mask(mask, output_dir)  # it was written before training as it began
    if callback is not None:
        state = callback.stats
    else:
        state = {"trainable_state_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
                 "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer)}
    delta = output_dir / DELTA_FILE
    if delta.is_file():
        state["delta_file_bytes"] = delta.stat().st_size
    state["dense_checkpoint_bytes"] = (output_dir / "model.safetensors").stat().st_size if (output_dir / "model.safetensors").is_file() else None
    results = {
        "task": task.name,
        "data_source": task.source,
        "data_split": getattr(task, "split", None) or None,
        "model": model_args.model,
        "method": sparse_args.method,
        "fish": bool(peft_args.fish) if sparse_args.is_peft else None,
        "layers": layer_config.to_dict() if layer_config else None,
        "selection": mask.config.get("selection") if mask is not None else (
            sparse_args.selection if sparse_args.method == "shira" else None),
        "selection_variant": mask.variant() if mask is not None else None,
        "budget": mask.config.get("budget_spec") if mask is not None else None,
        "method_options": _resolved_options(model, options),
        "peft_params": peft_params,
        "engine": sparse_args.engine if mask is not None else None,
        "fisher_batch_size": sparse_args.fisher_batch_size if mask is not None or "mask_fn" in options else None,
        "seed": training_args.seed,
        "keep_ratio": mask.density if mask is not None else 1.0,
        "trainable_params": trainable,
        "mask_allocation": mask.allocation() if mask is not None else (
            shira_entries.allocation() if shira_entries is not None else None),
        "mask_embedding_rows": rows,
        "total_params": total_params,
        "train_samples": len(train),
        "metrics": metrics,
        "train_seconds": train_seconds,
        "train_loss": train_output.training_loss if train_output is not None else None,
        "train_steps": trainer.state.global_step,
        "train_log": _loss_curve(trainer.state.log_history),
        "validation_log": _validation_curve(trainer.state.log_history),
        "eval_seconds": eval_seconds,
        "learning_rate": None if evaluate_only else training_args.learning_rate,
        "learning_rate_source": None if evaluate_only else getattr(training_args, "learning_rate_source", "given"),
        "batch_size": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps,
        "train_order": train_order(training_args, data_args.shuffle_length_groups),
        **recipe.timings,
        **state,
        "train_peak_rss_mb": train_peak["peak_rss_mb"],
        "mask_peak_rss_mb": mask_peak["peak_rss_mb"] if mask is not None or "mask_fn" in options else None,
        "mask_phase": _mask_phase_report(training_args.device, autocast, mask_peak, plan)
        if mask is not None or "mask_fn" in options else None,
        **{f"train_{k}": v for k, v in train_peak.items() if k != "peak_rss_mb"},
    }
    if option_scores:  # the split is fixed by its seed, so runs on one file score the same questions in this order
        results["option_log_likelihoods"] = option_scores
    if layerwise is not None and layerwise.history is not None:  # None when nothing was trained (--max-steps 0)
        results["layerwise"] = {**layerwise.stats, **_selection_summary(layerwise.history)}
    if mask is not None and mask.config.get("ird_report") is not None:  # which round IRD picked, and by what
        report = mask.config["ird_report"]
        results["ird"] = {"round": report["best_round"], "criterion": report["config"].get("criterion"),
                          "round_criteria": [r.get("criterion") for r in report["rounds"]]}
    results["world_size"] = training_args.world_size
    if trainer.is_world_process_zero():
        write_json(output_dir / "results.json", results)
    return results


def _resolved_options(model, options: dict) -> dict | None:
    """The PEFT config the run used, PEFT's defaults included (target modules, alpha ...), not only the flags."""
    config = getattr(model, "peft_config", {}).get("default") if hasattr(model, "peft_config") else None
    given = {k: v for k, v in options.items() if k != "mask_fn"}
    if config is None:
        return given or None
    resolved = {key: getattr(config, key) for key in ("r", "lora_alpha", "alpha", "lora_dropout", "target_modules",
                                                      "use_rslora", "use_dora", "init_lora_weights", "modules_to_save")
                if hasattr(config, key)}
    resolved = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in resolved.items()}
    return {**resolved, **given, **({"target_modules": resolved["target_modules"]} if "target_modules" in resolved
                                    else {})}


def _loss_curve(log_history: list[dict]) -> list[dict]:
    """Trainer's logged training losses (every --logging-steps), kept so a run's file shows whether it converged."""
    keys = ("step", "loss", "learning_rate", "grad_norm")
    return [{k: entry[k] for k in keys if k in entry} for entry in log_history if "loss" in entry]


def _validation_curve(log_history: list[dict]) -> list[dict]:
    """The validation scores Trainer logged during training (--eval-strategy steps|epoch): whether a run had
    converged on validation when it stopped, and where it peaked."""
    return [{"step": entry["step"], **{k[len("eval_"):]: v for k, v in entry.items()
                                       if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))}}
            for entry in log_history if "eval_loss" in entry]


def _validation_during_training(task, evaluation: dict, training_args: TrainingArguments):
    """The validation split Trainer evaluates every --eval-steps (or epoch), or None with --eval-strategy no.
    Checked before the mask phase, so a run that cannot validate fails before any expensive work."""
    if training_args.eval_strategy == "no":  # IntervalStrategy is a str enum
        return None
    if isinstance(task, MultipleChoiceTask):
        raise ValueError("--eval-strategy: validation during training is not available for multiple-choice tasks "
                         "(their options are scored outside Trainer). Use --eval-strategy no; the final validation "
                         "and test accuracies are in results.json.")
    # every loader gives a validation split (files need --validation-file); MNLI's first is the matched one
    return next(split for name, split in evaluation.items() if name.startswith("validation"))


def _selection_summary(history: dict) -> dict:
    counts = {str(b): 0 for b in history["block_ids"]}
    for selected in history["selections"]:
        for block in selected:
            counts[str(block)] += 1
    lowest = [min(s) for s in history["selections"] if s]
    probes = history.get("probes") or []
    return {"steps_trained_per_block": counts, "final_scores": {str(k): v for k, v in history["scores"].items()},
            "mean_lowest_selected_block": sum(lowest) / len(lowest) if lowest else None,
            "probes": len(probes), "probe_seconds": sum(p.get("seconds", 0.0) for p in probes)}


def _load_delta_base(base: str, header: dict):
    """The base model a delta applies to, with the head class it was trained with."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..models.catalog import resolve_model

    path = resolve_model(base)
    head = [s for n, s in header["shapes"].items() if n.split(".")[0] in ("classifier", "score") and n.endswith("weight")]
    architecture = header.get("architecture") or ("" if head else "ForCausalLM")  # deltas written before it was saved
    if architecture.endswith("ForCausalLM"):
        return AutoModelForCausalLM.from_pretrained(path), path
    kwargs = {"num_labels": head[-1][0], "ignore_mismatched_sizes": True} if head else {}
    return AutoModelForSequenceClassification.from_pretrained(path, **kwargs), path


def run_merge(base: str, delta_path: str, output_dir: str) -> Path:
    """Base model + sparse delta -> a normal dense transformers checkpoint (``from_pretrained`` loads it):
    a causal LM with ``AutoModelForCausalLM``, a classifier with ``AutoModelForSequenceClassification``."""
    from transformers import AutoTokenizer

    header, _ = read_delta(delta_path)
    model, path = _load_delta_base(base, header)
    apply_delta(model, delta_path)
    out = Path(output_dir)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def run_export_shira(base: str, delta_path: str, output_dir: str) -> dict:
    """Base model + sparse delta -> a PEFT SHiRA adapter folder, where the delta fits SHiRA (see
    ``sparsepeft.integrations.shira``); refused, by tensor name, where it does not."""
    from ..integrations.shira import export_delta_as_shira

    header, _ = read_delta(delta_path)
    model, _ = _load_delta_base(base, header)
    return export_delta_as_shira(model, delta_path, output_dir)
