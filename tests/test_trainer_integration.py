"""The callback inside transformers.Trainer: exactness, checkpoints and resume."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import assert_only_mask_moved, gradient_support, make_examples, make_model, random_score_mask
from sparsepeft import SparseMaskCallback, mask_from_checkpoint
from sparsepeft.data.collate import PaddingCollator


_mask = random_score_mask


def _args(out, **overrides):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
                max_grad_norm=0.5, num_train_epochs=2, report_to="none", disable_tqdm=True, use_cpu=True,
                logging_strategy="no", save_strategy="no", seed=3, data_seed=3, dataloader_pin_memory=False)
    base.update(overrides)
    return TrainingArguments(**base)


def _trainer(model, mask, args, n=24):
    return Trainer(model=model, args=args, train_dataset=make_examples(n, seed=4), data_collator=PaddingCollator(0),
                   callbacks=[SparseMaskCallback(mask)])


@pytest.mark.parametrize("overrides", [{}, {"bf16": True}, {"gradient_accumulation_steps": 2, "optim": "adamw_torch"}])
def test_only_masked_entries_change_under_trainer(tmp_path, overrides):
    model = make_model("bert")
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples, collate = make_examples(24, seed=4), PaddingCollator(0)
    support = gradient_support(model, [collate(examples[i:i + 4]) for i in range(0, 24, 4)])
    _trainer(model, mask, _args(tmp_path, **overrides)).train()
    assert_only_mask_moved(before, model, mask, min_moved_fraction=0.5, must_move=support)
    assert all(p.requires_grad for p in model.parameters())  # the callback hands the model back as it was


def test_checkpoint_holds_the_mask_and_resume_continues_identically(tmp_path):
    straight = make_model("bert")
    mask = _mask(straight)
    _trainer(straight, mask, _args(tmp_path / "a")).train()

    interrupted = make_model("bert")
    args = _args(tmp_path / "b", save_strategy="steps", save_steps=6)
    trainer = _trainer(interrupted, mask, args)
    trainer.train()
    checkpoint = tmp_path / "b" / "checkpoint-6"
    saved = mask_from_checkpoint(checkpoint)
    assert saved is not None and saved.num_selected == mask.num_selected

    resumed = make_model("bert")
    _trainer(resumed, saved, _args(tmp_path / "b", save_strategy="steps", save_steps=6)).train(
        resume_from_checkpoint=str(checkpoint))
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name  # resume is bit-identical
