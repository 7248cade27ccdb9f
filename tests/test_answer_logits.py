"""Answer-only logits (AnswerLogitsCollator): the same loss, gradients and Fisher as right padding with
full logits, computed at fewer positions."""

import pytest
import torch

from conftest import VOCAB, make_model, no_dropout
from sparsepeft import apply_method, estimate_fisher
from sparsepeft.data.collate import AnswerLogitsCollator, PaddingCollator, keeps_logits


def _prompt_answer_examples(n=6, seed=0):
    """Prompts of 3-10 tokens and answers of 1-4 tokens, labels on the answer only (as the LLM track trains)."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g).tolist()
        answer = torch.randint(3, VOCAB, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        examples.append({"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                         "labels": [-100] * len(prompt) + answer})
    return examples


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    output = model(**batch)
    output.loss.backward()
    return output, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama-lm", "gpt2-lm"])
def test_loss_and_gradients_equal_right_padding_with_full_logits(family):
    model = no_dropout(make_model(family, seed=1))
    examples = _prompt_answer_examples()
    full, full_grads = _loss_and_grads(model, PaddingCollator(0)(examples))
    trimmed_batch = AnswerLogitsCollator(0)(examples)
    trimmed, trimmed_grads = _loss_and_grads(model, trimmed_batch)
    width = max(len(e["input_ids"]) for e in examples)
    assert trimmed_batch["input_ids"].shape[1] == width
    assert trimmed.logits.shape[1] == trimmed_batch["logits_to_keep"] < width  # fewer positions projected
    assert torch.allclose(trimmed.loss, full.loss, rtol=1e-6, atol=1e-7)
    assert trimmed_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(trimmed_grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_the_column_before_the_first_answer_token_is_kept_and_labels_match_it():
    examples = [{"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [-100, -100, -100, 8, 9]},
                {"input_ids": [5, 6, 7], "attention_mask": [1] * 3, "labels": [-100, -100, 7]}]
    batch = AnswerLogitsCollator(0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 0, 5, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert batch["logits_to_keep"] == 3  # columns 2..4: column 2 predicts the first answer token
    assert batch["labels"].tolist() == [[-100, 8, 9], [-100, -100, 7]]


def test_per_sample_fisher_is_unchanged():
    model = make_model("llama-lm", seed=2)
    examples = _prompt_answer_examples(n=8, seed=3)
    kwargs = dict(num_samples=8, batch_size=4, task_type="causal_lm", progress=False)
    full = estimate_fisher(model, examples, collate_fn=PaddingCollator(0), **kwargs)
    trimmed = estimate_fisher(model, examples, collate_fn=AnswerLogitsCollator(0), **kwargs)
    assert full.keys() == trimmed.keys()
    for name, value in full.items():
        assert torch.allclose(trimmed[name], value, rtol=1e-4, atol=1e-12), name


def test_models_that_can_keep_logits_are_recognised_through_peft():
    lm = make_model("llama-lm")
    assert keeps_logits(lm) and keeps_logits(make_model("gpt2-lm"))
    assert keeps_logits(apply_method(lm, "lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}))
    assert not keeps_logits(make_model("bert"))
