"""Selection variants of full-model masks: scores, candidates, per-block budgets, reference budgets, warm-up."""

import pytest
import torch

from conftest import make_examples, make_model, no_dropout
from sparsepeft import select_mask
from sparsepeft.data.collate import collator_for
from sparsepeft.experiments.pipeline import MaskRecipe, build_mask
from sparsepeft.importance.scores import importance_scores, mean_gradient
from sparsepeft.models.peft import reference_count
from sparsepeft.selection import BudgetError
from sparsepeft.selection.candidates import CandidateError, candidate_parameters
from sparsepeft.selection.grouped import grouped_fisher_mask
from sparsepeft.selection.mask import layer_of
from sparsepeft.utils.names import matches_module


def _reference_mean_gradient(model, examples):
    """One sample at a time, the plain way: the average of the per-sample loss gradients."""
    collate = collator_for(model)
    model.eval()
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for example in examples:
        model.zero_grad()
        batch = collate([example])
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        torch.nn.functional.cross_entropy(out.logits, batch["labels"]).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                total[n] += p.grad.double()
    model.zero_grad()
    return {n: t / len(examples) for n, t in total.items()}


def test_mean_gradient_agrees_with_a_per_sample_loop_and_leaves_the_model_as_it_was():
    model = no_dropout(make_model("bert"))
    examples = make_examples(12)
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    gradient = mean_gradient(model, examples, num_samples=12, batch_size=5)
    assert model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    reference = _reference_mean_gradient(model, examples)
    for name, value in gradient.items():
        assert torch.allclose(value.double(), reference[name], atol=1e-6, rtol=1e-4), name


def test_taylor_and_magnitude_scores_are_what_they_say():
    model = no_dropout(make_model("bert"))
    examples = make_examples(8)
    gradient = mean_gradient(model, examples, num_samples=8, batch_size=4)
    taylor = importance_scores(model, examples, "taylor", num_samples=8, batch_size=4)
    magnitude = importance_scores(model, examples, "magnitude")
    absolute = importance_scores(model, examples, "gradient", num_samples=8, batch_size=4)
    for name, param in model.named_parameters():
        assert torch.allclose(taylor[name], (param.detach() * gradient[name]).abs(), atol=1e-7)
        assert torch.equal(magnitude[name], param.detach().abs())
        assert torch.equal(absolute[name], gradient[name].abs())
    with pytest.raises(ValueError, match="Unknown importance 'snip'"):
        importance_scores(model, examples, "snip")


def test_linear_candidates_are_the_blocks_linear_weights_plus_the_head():
    model = make_model("bert")
    chosen = candidate_parameters(model, "linear", always_train=("classifier",))
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n}
    assert set(chosen) == linear | {"classifier.weight", "classifier.bias"}
    assert not any("pooler" in n or "embeddings" in n or n.endswith("bias") and "classifier" not in n for n in chosen)
    without = candidate_parameters(model, "!pooler,!embeddings", always_train=("classifier",))
    assert not any("pooler" in n or "embeddings" in n for n in without)
    assert len(without) == sum(1 for n, _ in model.named_parameters() if "pooler" not in n and "embeddings" not in n)
    with pytest.raises(CandidateError, match="--candidates pattern 'poolr' matches no trainable parameter"):
        candidate_parameters(model, "poolr")
    with pytest.raises(CandidateError, match="leaves nothing to rank"):
        candidate_parameters(model, "classifier", always_train=("classifier",))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_tied_head_answers_to_both_names(tied):
    """SmolLM2 ties its output head to the input embedding: the one matrix is listed once, as embed_tokens, and
    '!lm_head' used to be refused as matching nothing. Either name now removes it; untied, each removes its own."""
    from transformers import LlamaForCausalLM

    config = make_model("llama-lm").config
    config.tie_word_embeddings = tied
    model = LlamaForCausalLM(config)
    every = {n for n, _ in model.named_parameters()}
    for pattern, removed in (("!embed_tokens", {"model.embed_tokens.weight"}),
                             ("!lm_head", {"model.embed_tokens.weight" if tied else "lm_head.weight"}),
                             ("!embed_tokens,!lm_head", {"model.embed_tokens.weight", "lm_head.weight"} & every)):
        assert every - set(candidate_parameters(model, pattern)) == removed, pattern
    assert set(candidate_parameters(model, "lm_head")) == ({"model.embed_tokens.weight"} if tied else {"lm_head.weight"})


def _per_block_reference(scores, k):
    """Each block's share by size (largest remainder), then a stable descending sort inside the block."""
    from sparsepeft.selection.topk import proportional_quotas

    blocks = {}
    for name in scores:
        blocks.setdefault(layer_of(name), []).append(name)
    quotas = proportional_quotas({b: sum(scores[n].numel() for n in names) for b, names in blocks.items()}, k)
    kept = {}
    for block, names in blocks.items():
        flat = torch.cat([scores[n].reshape(-1) for n in names])
        order = torch.sort(flat, descending=True, stable=True).indices[:quotas[block]]
        offsets = torch.tensor([0] + [scores[n].numel() for n in names]).cumsum(0)
        for i, name in enumerate(names):
            inside = order[(order >= offsets[i]) & (order < offsets[i + 1])] - offsets[i]
            if inside.numel():
                kept[name] = inside.sort().values.tolist()
    return kept, quotas


def test_per_block_keeps_each_blocks_share_and_its_best_entries():
    model = make_model("bert")
    g = torch.Generator().manual_seed(3)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    mask = select_mask(scores, keep_ratio=0.05, strategy="per_block", model=model)
    ranked = {n: s for n, s in scores.items() if "classifier" not in n}
    head = sum(s.numel() for n, s in scores.items() if "classifier" in n)
    expected, quotas = _per_block_reference(ranked, mask.num_selected - head)
    assert {n: mask.indices[n].tolist() for n in expected} == expected
    per_block = {}
    for name in ranked:
        per_block[layer_of(name)] = per_block.get(layer_of(name), 0) + mask.kept(name)
    assert per_block == quotas


@pytest.mark.parametrize("strategy", ["global", "per_block", "per_tensor"])
def test_a_grouped_fisher_mask_is_the_one_pass_mask_under_every_strategy(strategy):
    from sparsepeft import estimate_fisher

    model = no_dropout(make_model("bert"))
    examples = make_examples(16)
    names = [n for n, _ in model.named_parameters()]
    groups = [names[i::3] for i in range(3)]
    kwargs = dict(num_samples=16, batch_size=8, progress=False)
    one_pass = select_mask(estimate_fisher(model, examples, **kwargs), strategy=strategy, budget=900, model=model)
    grouped = grouped_fisher_mask(model, examples, groups, strategy=strategy, budget=900, **kwargs)
    assert grouped.digest() == one_pass.digest()


def _recipe(**fields):
    return MaskRecipe(num_samples=16, fisher_batch_size=8, keep_ratio=0.05, **fields)


def test_a_pattern_restricted_mask_keeps_nothing_outside_its_pattern_and_the_budget_is_loras_count():
    model = make_model("bert")
    examples = make_examples(16)
    mask = build_mask(model, examples, _recipe(candidates="linear", budget="lora:r=4", importance="gradient"),
                      collator_for(model))
    allowed = set(candidate_parameters(model, "linear", always_train=("classifier",)))
    assert set(mask.shapes) == allowed and set(mask.indices) <= allowed
    assert mask.num_selected == reference_count(model, "lora", {"r": 4}) == mask.config["budget"]
    assert mask.is_full("classifier.weight")
    variant = mask.variant()
    assert variant["importance"] == "gradient" and variant["candidates"] == "linear"
    assert variant["budget_spec"] == "lora:r=4"
    shares = mask.allocation()
    assert sum(v["kept"] for v in shares["per_module_type"].values()) == mask.num_selected
    assert sum(v["kept"] for v in shares["per_block"].values()) == mask.num_selected


def test_a_budget_larger_than_the_candidates_is_refused_naming_the_flag():
    model = make_model("bert")
    with pytest.raises(BudgetError, match="--budget lora:r=64.*--candidates 'query'"):
        build_mask(model, make_examples(8), _recipe(candidates="query", budget="lora:r=64"), collator_for(model))


def test_warmup_measures_after_the_warm_up_and_puts_every_weight_back():
    model = make_model("bert")
    examples = make_examples(24)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    at_init = build_mask(model, examples, _recipe(), collator_for(model))
    warmed = build_mask(model, examples, _recipe(fisher_at="warmup", warmup_steps=4, warmup_lr=1e-2),
                        collator_for(model))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # bit-identical afterwards
    assert warmed.digest() != at_init.digest()
    assert warmed.config["warmup"]["steps"] == 4 and warmed.config["fisher_at"] == "warmup"
    with pytest.raises(ValueError, match="random mask measures nothing"):
        build_mask(model, examples, _recipe(method="random", fisher_at="warmup"), collator_for(model))
    with pytest.raises(ValueError, match="--fisher-warmup-steps >= 1"):
        build_mask(model, examples, _recipe(fisher_at="warmup", warmup_steps=0), collator_for(model))


def test_random_masks_take_the_same_candidates_and_budget():
    model = make_model("bert")
    mask = build_mask(model, make_examples(8), _recipe(method="random", candidates="query,value", budget="20%"),
                      collator_for(model))
    assert all(matches_module(n, ["query", "value", "classifier"]) for n in mask.shapes)
    assert mask.num_selected == round(0.2 * mask.num_candidates)
