"""``sparsepeft train`` and ``sparsepeft mask``: the example-script recipes, written out."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from ..data import compute_metrics
from ..experiments.pipeline import PeakMemory, build_mask, featurize, load_model_and_tokenizer, load_task_data
from ..engines import apply_delta, optimizer_state_bytes, read_delta
from ..integrations import DELTA_FILE, MASK_FILE, SparseMaskCallback, mask_from_checkpoint
from ..selection import SparseMask
from ..utils.io import write_json
from .arguments import DataArguments, ModelArguments, SparseArguments

logger = logging.getLogger("sparsepeft")


def _prepare(model_args: ModelArguments, data_args: DataArguments, sparse_args: SparseArguments, seed: int):
    task = load_task_data(data_args.task, data_args.data_dir, data_args.train_file, data_args.validation_file,
                          [c for c in data_args.text_columns.split(",") if c], data_args.label_column,
                          data_args.task_type)
    model, tokenizer = load_model_and_tokenizer(model_args.model, task, model_args.ignore_mismatched_sizes)
    train, evaluation = featurize(task, tokenizer, model_args.max_seq_length, data_args.max_train_samples,
                                  data_args.max_eval_samples, seed)
    return task, model, tokenizer, train, evaluation


def _make_mask(model, tokenizer, train, sparse_args: SparseArguments, recipe, model_name: str):
    if sparse_args.mask_file:
        mask = SparseMask.load(sparse_args.mask_file)
        mask.check_compatible(model)
        return mask
    return build_mask(model, train, recipe, DataCollatorWithPadding(tokenizer), model_name=model_name)


def _save_mask(mask: SparseMask, output_dir: Path) -> None:
    mask.save(output_dir / MASK_FILE)
    mask.plot(output_dir / "mask_density.png")


def run_mask(model_args, data_args, sparse_args, training_args: TrainingArguments) -> dict:
    """Compute and save a mask only (``sparse_mask.safetensors``, density plot, ``mask_summary.json``)."""
    if sparse_args.method == "full":
        raise ValueError("`sparsepeft mask` makes a mask: use --method fish or random.")
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    task, model, tokenizer, train, _ = _prepare(model_args, data_args, sparse_args, training_args.seed)
    recipe = sparse_args.recipe(training_args.seed)
    mask = _make_mask(model, tokenizer, train, sparse_args, recipe, model_args.model)
    _save_mask(mask, output_dir)
    summary = {"task": task.name, "model": model_args.model, **recipe.timings, **mask.summary()}
    write_json(output_dir / "mask_summary.json", summary)
    logger.info("Saved a mask of %d entries (%.4f%%) to %s", mask.num_selected, 100 * mask.density, output_dir)
    return summary


def run_train(model_args, data_args, sparse_args, training_args: TrainingArguments) -> dict:
    """Fine-tune with the chosen method, evaluate on every dev split, write model, mask and results.json."""
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    task, model, tokenizer, train, evaluation = _prepare(model_args, data_args, sparse_args, training_args.seed)
    recipe = sparse_args.recipe(training_args.seed)
    resume = training_args.resume_from_checkpoint
    mask = mask_from_checkpoint(resume) if resume and os.path.isdir(resume) else None
    mask_phase = PeakMemory()
    if mask is None:
        mask = _make_mask(model, tokenizer, train, sparse_args, recipe, model_args.model)
    else:
        mask.check_compatible(model)
        logger.info("Resuming with the mask saved in %s", resume)
    mask_peak = mask_phase.read_mb()
    if mask is not None:
        _save_mask(mask, output_dir)

    def metrics_fn(prediction):
        return compute_metrics(task.metrics, prediction.predictions, prediction.label_ids)

    total_params = sum(p.numel() for p in model.parameters())
    callback = SparseMaskCallback(mask, engine=sparse_args.engine) if mask is not None else None
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=metrics_fn,
        callbacks=[callback] if callback is not None else None,
    )
    trainable = mask.num_selected if mask is not None else sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_phase = PeakMemory()
    start = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start
    train_peak = train_phase.read_mb()
    metrics = {}
    for split, features in evaluation.items():
        scores = trainer.evaluate(features, metric_key_prefix=split)
        metrics[split] = {k[len(split) + 1 :]: v for k, v in scores.items()
                          if k.startswith(f"{split}_") and not k.endswith(("runtime", "per_second"))}
    trainer.save_model(str(output_dir))  # a plain dense model: the callback detached its engine at train end
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
        "model": model_args.model,
        "method": sparse_args.method,
        "engine": sparse_args.engine if mask is not None else None,
        "seed": training_args.seed,
        "keep_ratio": sparse_args.keep_ratio if mask is not None else 1.0,
        "trainable_params": trainable,
        "total_params": total_params,
        "train_samples": len(train),
        "metrics": metrics,
        "train_seconds": train_seconds,
        "train_loss": train_output.training_loss,
        **recipe.timings,
        **state,
        "train_peak_rss_mb": train_peak["peak_rss_mb"],
        "mask_peak_rss_mb": mask_peak["peak_rss_mb"] if mask is not None else None,
        **{f"train_{k}": v for k, v in train_peak.items() if k != "peak_rss_mb"},
    }
    write_json(output_dir / "results.json", results)
    return results


def run_merge(base: str, delta_path: str, output_dir: str) -> Path:
    """Base model + sparse delta -> a normal dense transformers checkpoint (``from_pretrained`` loads it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..experiments.pipeline import resolve_model

    header, _ = read_delta(delta_path)
    path = resolve_model(base)
    head = [s for n, s in header["shapes"].items() if n.split(".")[0] in ("classifier", "score") and n.endswith("weight")]
    kwargs = {"num_labels": head[-1][0], "ignore_mismatched_sizes": True} if head else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    apply_delta(model, delta_path)
    out = Path(output_dir)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out
