"""FISH-Tuning: Fisher masks inside PEFT modules — scope, budgets, exact training, PEFT interop."""

import warnings

import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import assert_only_mask_moved, make_examples, make_model
from reference import loop_fisher, relative_error
from sparsepeft import SparseMaskCallback, estimate_fisher, mask_from_checkpoint
from sparsepeft.data.collate import PaddingCollator
from sparsepeft.importance.warmup import dense_warmup
from sparsepeft.models.peft import apply_method, reference_count, tuned_parameters
from sparsepeft.selection import Budget, BudgetError
from sparsepeft.selection.fish_tuning import FishTuningConfig, fish_tuning_mask

TARGETS = {"target_modules": ["query", "value"]}
PEFT_CASES = [
    ("lora", {"r": 4, **TARGETS}),
    ("dora", {"r": 4, "target_modules": ["query", "value", "dense"]}),
    ("rslora", {"r": 4, **TARGETS}),
    ("pissa", {"r": 4, **TARGETS}),
    ("adalora", {"r": 4, "total_step": 20, **TARGETS}),
    ("ia3", {"target_modules": ["query", "value", "dense"], "feedforward_modules": ["dense"]}),
    ("loha", {"r": 4, **TARGETS}),
    ("lokr", {"r": 4, **TARGETS}),
    ("vera", {"r": 8, **TARGETS}),
    ("houlsby", {"bottleneck_size": 4}),
    ("pfeiffer", {"bottleneck_size": 4}),
    ("parallel", {"bottleneck_size": 4}),
]


def _tuned(method, options, family="bert", dtype=torch.float32):
    model = apply_method(make_model(family), method, options).to(dtype)  # PiSSA initialises in float32 only
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # move zero-initialised factors off zero so every candidate has a gradient
        for name, p in tuned_parameters(model).items():
            if not name.startswith(("classifier", "base_model.model.classifier")):
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


@pytest.mark.parametrize("method,options", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_fisher_of_every_peft_method_equals_the_batch_size_one_loop(method, options):
    model = _tuned(method, options, dtype=torch.float64)
    examples = make_examples(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IA3/LoHa/LoKr/VeRA/AdaLoRA factors are scored by the exact loop
        fast = estimate_fisher(model, examples, num_samples=10, batch_size=4, params=list(tuned_parameters(model)),
                               progress=False)
    assert relative_error(fast, loop_fisher(model, examples)) < 1e-10


@pytest.mark.parametrize("method", ["lora", "dora", "houlsby", "parallel"])
def test_fast_rules_cover_lora_dora_and_adapters_without_the_slow_fallback(method):
    options = dict(PEFT_CASES)[method]
    model = _tuned(method, options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimate_fisher(model, make_examples(6), num_samples=6, batch_size=3, progress=False)


def test_budget_of_a_reference_config_is_met_exactly():
    model = apply_method(make_model("bert"), "lora", {"r": 8, **TARGETS})
    count = reference_count(model, "lora", {"r": 4}, defaults={"r": 8, **TARGETS})
    assert count == sum(p.numel() for p in apply_method(make_model("bert"), "lora", {"r": 4, **TARGETS}).parameters()
                        if p.requires_grad)
    counter = lambda m, o: reference_count(model, m, o, defaults={"r": 8, **TARGETS})  # noqa: E731
    for selection in ("fisher", "random", "lowest"):
        mask = fish_tuning_mask(model, make_examples(16), FishTuningConfig(budget="lora:r=4", selection=selection,
                                warmup_steps=3, num_samples=16), reference_count=counter, progress=False)
        assert mask.num_selected == count
        assert all(mask.is_full(n) for n in mask.shapes if "classifier" in n)  # the head is inside the budget


def test_budget_parsing():
    assert Budget.parse("74498").resolve(10**6) == 74498
    assert Budget.parse("50%").resolve(1000) == 500
    assert Budget.parse("0.25").resolve(1000) == 250
    spec = Budget.parse("lora:r=8,target_modules=query+value")
    assert spec.reference == "lora" and spec.reference_options == {"r": 8, "target_modules": ["query", "value"]}
    for bad in ("", "-3", "150%", "lots", "lora:r"):
        with pytest.raises(BudgetError):
            Budget.parse(bad)


def test_selections_differ_and_lowest_is_the_opposite_end_of_the_fisher():
    model = _tuned("lora", {"r": 4, **TARGETS})
    data = make_examples(16)
    masks = {s: fish_tuning_mask(model, data, FishTuningConfig(budget="30%", selection=s, fisher_at="init",
                                                               num_samples=16), progress=False)
             for s in ("fisher", "random", "lowest")}
    fisher = estimate_fisher(model, data, num_samples=16, params=list(tuned_parameters(model)), progress=False)
    scores = {n: f for n, f in fisher.items() if "classifier" not in n}
    chosen = lambda m: torch.cat([m.dense(n).flatten() for n in scores])  # noqa: E731
    values = torch.cat([scores[n].flatten() for n in scores])
    assert values[chosen(masks["fisher"])].min() >= values[chosen(masks["lowest"])].max()
    assert len({m.num_selected for m in masks.values()}) == 1
    assert not torch.equal(chosen(masks["fisher"]), chosen(masks["random"]))


def test_fisher_at_init_cannot_rank_lora_A_and_warmup_can_without_moving_the_adapter():
    model = apply_method(make_model("bert"), "lora", {"r": 4, **TARGETS})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = tuned_parameters(model)
    at_init = estimate_fisher(model, make_examples(8), num_samples=8, params=list(params), progress=False)
    assert all(float(v.abs().max()) == 0 for n, v in at_init.items() if "lora_A" in n)  # B = 0 at init
    mask = fish_tuning_mask(model, make_examples(16), FishTuningConfig(budget="40%", warmup_steps=5, num_samples=16),
                            progress=False)
    assert sum(mask.kept(n) for n in mask.shapes if "lora_A" in n) > 0
    assert mask.config["warmup"]["steps"] == 5
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # the warm-up was undone exactly
        assert param.requires_grad == (name in params)


def test_the_warm_up_trains_only_its_parameters_then_restores_weights_flags_and_mode():
    model = apply_method(make_model("bert"), "lora", {"r": 4, **TARGETS})
    params = {n: p for n, p in tuned_parameters(model).items() if "lora_" in n}
    outside_name, outside = next((n, p) for n, p in model.named_parameters() if "embeddings" in n)
    outside.requires_grad_(True)  # a user's extra trainable tensor: the warm-up must leave it as it found it
    model.eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with dense_warmup(model, make_examples(16), params, steps=3, batch_size=4, collate_fn=PaddingCollator(0)):
        assert model.training and not outside.requires_grad
        moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= set(params)  # only its parameters trained
    assert not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and flags[outside_name]
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def _trainer(model, mask, out, **overrides):
    args = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=5e-2, weight_decay=0.1,
                num_train_epochs=2, report_to="none", disable_tqdm=True, use_cpu=True, logging_strategy="no",
                save_strategy="no", seed=3, data_seed=3, dataloader_pin_memory=False)
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=make_examples(24, seed=4),
                   data_collator=PaddingCollator(0), callbacks=[SparseMaskCallback(mask)])


@pytest.mark.parametrize("family,method,options", [
    ("bert", "lora", {"r": 8, **TARGETS}),
    ("bert", "dora", {"r": 8, **TARGETS}),
    ("llama", "lora", {"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("bert", "houlsby", {"bottleneck_size": 8}),
    ("llama", "parallel", {"bottleneck_size": 8}),
])
def test_only_selected_adapter_entries_change_and_the_base_never_does(tmp_path, family, method, options):
    model = apply_method(make_model(family), method, options)
    mask = fish_tuning_mask(model, make_examples(16), FishTuningConfig(budget="50%", warmup_steps=3, num_samples=16),
                            progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trainer(model, mask, tmp_path).train()
    for name, param in model.named_parameters():
        if name not in mask.shapes:
            assert torch.equal(param, before[name]), f"base weight {name} moved"
    assert_only_mask_moved({n: before[n] for n in mask.shapes}, _Scoped(model, mask), mask, min_moved_fraction=0.3)


class _Scoped:
    """The model's parameters restricted to the mask's candidates (for assert_only_mask_moved)."""

    def __init__(self, model, mask):
        self.params = [(n, p) for n, p in model.named_parameters() if n in mask.shapes]

    def named_parameters(self):
        return iter(self.params)


def test_trained_adapter_saves_in_peft_format_loads_and_merges_with_identical_outputs(tmp_path):
    from peft import PeftModel

    model = apply_method(make_model("bert"), "lora", {"r": 8, **TARGETS})
    mask = fish_tuning_mask(model, make_examples(16), FishTuningConfig(budget="lora:r=4", warmup_steps=3,
                            num_samples=16), reference_count=lambda m, o: reference_count(model, m, o, {**TARGETS}),
                            progress=False)
    _trainer(model, mask, tmp_path / "run").train()
    model.save_pretrained(tmp_path / "adapter")
    batch = {k: v for k, v in PaddingCollator(0)(make_examples(5)).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        loaded = PeftModel.from_pretrained(make_model("bert"), tmp_path / "adapter").eval()
        assert torch.equal(loaded(**batch).logits, expected)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-6)
    plain = make_model("bert")  # merged inference costs what the vanilla merged model costs: the same tensors
    assert [(n, p.shape) for n, p in merged.named_parameters()] == [(n, p.shape) for n, p in plain.named_parameters()]


def test_resume_from_a_trainer_checkpoint_continues_with_the_same_mask(tmp_path):
    def fresh():
        return apply_method(make_model("bert"), "lora", {"r": 8, **TARGETS})

    straight = fresh()
    mask = fish_tuning_mask(straight, make_examples(16), FishTuningConfig(budget="50%", warmup_steps=3,
                                                                          num_samples=16), progress=False)
    _trainer(straight, mask, tmp_path / "a").train()
    interrupted = fresh()
    _trainer(interrupted, mask, tmp_path / "b", save_strategy="steps", save_steps=6).train()
    checkpoint = tmp_path / "b" / "checkpoint-6"
    saved = mask_from_checkpoint(checkpoint)
    assert saved.shapes == mask.shapes and all(torch.equal(saved.indices[n], mask.indices[n]) for n in mask.indices)
    resumed = fresh()
    _trainer(resumed, saved, tmp_path / "b", save_strategy="steps", save_steps=6).train(
        resume_from_checkpoint=str(checkpoint))
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_bad_input_is_a_clear_error():
    plain = make_model("bert")
    with pytest.raises(ValueError, match="no PEFT modules"):
        fish_tuning_mask(plain, make_examples(4), FishTuningConfig(num_samples=4), progress=False)
    model = apply_method(make_model("bert"), "lora", {"r": 2, **TARGETS})
    total = sum(p.numel() for p in tuned_parameters(model).values())
    with pytest.raises(BudgetError, match="larger than the"):
        fish_tuning_mask(model, make_examples(4), FishTuningConfig(budget=str(total + 1), num_samples=4), progress=False)
    with pytest.raises(BudgetError, match="always-trained"):
        fish_tuning_mask(model, make_examples(4), FishTuningConfig(budget="10", fisher_at="init", num_samples=4),
                         progress=False)
    with pytest.raises(ValueError, match="match no layer"):
        apply_method(make_model("bert"), "lora", {"target_modules": ["no_such_proj"]})
    with pytest.raises(ValueError, match="selection"):
        FishTuningConfig(selection="best")


@pytest.mark.parametrize("method,options", [c for c in PEFT_CASES if c[0] not in ("lora", "dora", "houlsby", "parallel")],
                         ids=[c[0] for c in PEFT_CASES if c[0] not in ("lora", "dora", "houlsby", "parallel")])
def test_every_other_method_trains_only_its_selected_entries(method, options):
    from sparsepeft import DenseMaskEngine

    model = _tuned(method, options)
    mask = fish_tuning_mask(model, make_examples(12), FishTuningConfig(budget="40%", fisher_at="init", num_samples=12),
                            progress=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = DenseMaskEngine(model, mask).attach()
    optimizer = torch.optim.AdamW(engine.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    engine.attach_optimizer(optimizer)
    model.train()
    batch = PaddingCollator(0)(make_examples(8, seed=9))
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    engine.detach()
    for name, param in model.named_parameters():
        if name not in mask.shapes:
            assert torch.equal(param, before[name]), f"base weight {name} moved"
    assert_only_mask_moved({n: before[n] for n in mask.shapes}, _Scoped(model, mask), mask, min_moved_fraction=0.3)
