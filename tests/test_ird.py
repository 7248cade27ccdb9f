"""IRD: per-sample Fisher mass, round bookkeeping, equality with FISH at one round, determinism."""

import pytest
import torch

from conftest import make_examples, make_model
from reference import per_sample_loss
from sparsepeft import estimate_fisher, select_mask
from sparsepeft.importance.fisher import estimate_fisher_and_sample_mass
from sparsepeft.models.peft import apply_method, tuned_parameters
from sparsepeft.selection.ird import IRDConfig, ird_search


def _loop_mass(model, examples, ranges, task="classification"):
    """Each sample's sum of squared gradient entries inside ``ranges``, one sample at a time."""
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    masses = []
    for example in examples:
        grads = torch.autograd.grad(per_sample_loss(model, example, task)[0], [p for _, p in params], allow_unused=True)
        total = 0.0
        for (name, _), grad in zip(params, grads):
            if grad is not None and name in ranges:
                square = grad.double() ** 2
                total += float(square.sum() if ranges[name] is None else square[ranges[name]].sum())
        masses.append(total)
    return torch.tensor(masses, dtype=torch.float64)


@pytest.mark.parametrize("family,task", [("bert", "classification"), ("gpt2-lm", "lm"), ("llama", "classification")])
def test_per_sample_mass_equals_a_batch_size_one_loop(family, task):
    model = make_model(family).double()
    examples = make_examples(9, lm=task == "lm")
    g = torch.Generator().manual_seed(3)
    ranges = {n: (None if i % 3 == 0 else torch.rand(p.shape, generator=g) < 0.3)
              for i, (n, p) in enumerate(model.named_parameters()) if i % 5 != 4}  # some tensors out of range
    order = [4, 0, 7, 2, 8, 1, 3, 6, 5]
    _, mass = estimate_fisher_and_sample_mass(model, examples, order, ranges, batch_size=4, progress=False)
    expected = _loop_mass(model, [examples[i] for i in order], ranges, task)
    torch.testing.assert_close(mass, expected, rtol=1e-9, atol=1e-12)


def test_rounds_shrink_as_configured_and_keep_the_top_samples_by_mass():
    model = make_model("bert")
    data = make_examples(90)
    config = IRDConfig(num_samples=64, rounds=3, sample_shrink=0.5, param_shrink=0.2, criterion_samples=16)
    result = ird_search(model, data, keep_ratio=0.02, config=config, progress=False)
    rounds = result.rounds
    candidates = sum(p.numel() for p in model.parameters())
    budget = round(0.02 * candidates)
    assert [r["samples"] for r in rounds] == [64, 32, 16]
    assert [r["parameter_range"] for r in rounds] == [
        candidates, int(candidates * 0.2), max(budget, int(int(candidates * 0.2) * 0.2))]
    assert all(r["selected"] == budget for r in rounds)
    assert rounds[0]["overlap_with_fish"] == 1.0 and rounds[0]["overlap_with_previous"] is None
    masks = [mask for _, mask in result.pairs]
    for r in (1, 2):  # the overlaps are the shares of the budget two rounds' masks have in common, counted here
        shared = sum(int((masks[r].dense(n) & masks[r - 1].dense(n)).sum()) for n in masks[r].shapes)
        assert rounds[r]["overlap_with_previous"] == pytest.approx(shared / budget)
        first = sum(int((masks[r].dense(n) & masks[0].dense(n)).sum()) for n in masks[r].shapes)
        assert rounds[r]["overlap_with_fish"] == pytest.approx(first / budget)
    assert result.samples == result.pairs[result.best_round][0]
    # round 1 keeps the 32 samples of round 0 with the largest mass over every parameter (round 0's range)
    initial = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:64].tolist()
    assert result.pairs[0][0] == initial
    mass = _loop_mass(model, [data[i] for i in initial], {n: None for n, _ in model.named_parameters()})
    assert result.pairs[1][0] == [initial[j] for j in torch.argsort(mass, descending=True, stable=True)[:32].tolist()]
    # the sample range only narrows
    assert set(result.pairs[2][0]) <= set(result.pairs[1][0])


def test_one_round_without_shrink_is_the_plain_fish_mask():
    model = make_model("bert")
    data = make_examples(50)
    result = ird_search(model, data, keep_ratio=0.05,
                        config=IRDConfig(num_samples=32, rounds=1, sample_shrink=1.0, param_shrink=1.0), progress=False)
    fish = select_mask(estimate_fisher(model, data, num_samples=32, seed=0, progress=False), 0.05, model=model)
    assert result.best_round == 0 and result.mask.num_selected == fish.num_selected
    for name in fish.shapes:
        assert torch.equal(result.mask.dense(name), fish.dense(name)), name


def test_search_is_deterministic_under_a_seed_and_works_in_peft_scope(tmp_path):
    model = apply_method(make_model("bert"), "lora", {"r": 4, "target_modules": ["query", "value"]})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    data = make_examples(60)
    config = IRDConfig(num_samples=40, rounds=3, criterion_samples=10, seed=5)
    names = list(tuned_parameters(model))
    a = ird_search(model, data, budget=300, config=config, params=names, progress=False)
    b = ird_search(model, data, budget=300, config=config, params=names, progress=False)
    assert a.samples == b.samples and a.best_round == b.best_round
    assert set(a.mask.shapes) == set(names) and a.mask.num_selected == 300
    for name in a.mask.shapes:
        assert torch.equal(a.mask.dense(name), b.mask.dense(name))
    a.save_report(tmp_path / "ird.json")
    a.plot(tmp_path / "ird.png")
    assert (tmp_path / "ird.png").stat().st_size > 1000


def test_bad_input_is_a_clear_error():
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="sample_shrink"):
            IRDConfig(sample_shrink=bad)
    with pytest.raises(ValueError, match="param_shrink"):
        IRDConfig(param_shrink=0.0)
    model, data = make_model("bert"), make_examples(12)
    with pytest.raises(ValueError, match="cannot shrink"):
        ird_search(model, data, config=IRDConfig(num_samples=2, rounds=3), progress=False)
    with pytest.raises(ValueError, match="held-out"):
        ird_search(model, data, config=IRDConfig(num_samples=12, rounds=2, criterion="probe"), progress=False)
    with pytest.raises(ValueError, match="criterion"):
        IRDConfig(criterion="vibes")


def test_the_probe_criterion_picks_a_later_round_when_its_mask_is_better(monkeypatch):
    """A constructed case: round 0's Fisher ranks two embedding rows no example uses above everything (training
    them cannot change any loss), round 1's ranks the classifier first. The probe criterion measures both masks
    by held-out loss after the same short masked fit and must choose round 1; round 0's loss is the untrained one."""
    import sparsepeft.selection.ird as ird

    model = make_model("bert")
    data = make_examples(48)  # token ids 3.., so rows 1 and 2 of the word embeddings are never looked up
    unused, head = "bert.embeddings.word_embeddings.weight", "classifier.weight"
    calls = []

    def constructed_fisher(model, data, samples, param_range, **kwargs):
        generator = torch.Generator().manual_seed(len(calls))
        fisher = {n: torch.rand(p.shape, generator=generator) for n, p in model.named_parameters()}
        fisher[unused][1:3] = 3.0 if not calls else 0.0
        fisher[head][:] = 2.0 if not calls else 3.0
        calls.append(len(samples))
        return fisher, torch.arange(len(samples), 0, -1, dtype=torch.float64)

    monkeypatch.setattr(ird, "estimate_fisher_and_sample_mass", constructed_fisher)
    budget = model.classifier.weight.numel()
    assert model.bert.embeddings.word_embeddings.weight[1:3].numel() == budget
    config = IRDConfig(num_samples=32, rounds=2, param_shrink=0.1, always_train=(), probe_steps=10, probe_lr=1e-2)
    assert config.criterion == "probe"  # the default: it is not biased toward round 0 by construction
    untrained = _held_out_loss(model, data)
    result = ird_search(model, data, budget=budget, config=config, eval_data=data, progress=False)
    masks = [mask for _, mask in result.pairs]
    assert calls == [32, 16]
    assert set(masks[0].indices) == {unused} and set(masks[1].indices) == {head}
    loss_round0, loss_round1 = (r["criterion"] for r in result.rounds)
    assert loss_round0 == pytest.approx(untrained, rel=1e-6)
    assert loss_round1 < loss_round0 - 1e-3
    assert result.best_round == 1 and result.mask is masks[1]


def _held_out_loss(model, examples):
    from sparsepeft.data.collate import collator_for
    from sparsepeft.importance.fisher import _forward_logits
    from sparsepeft.importance.losses import TaskType, empirical_nll

    task = TaskType.CLASSIFICATION
    model.eval()
    with torch.no_grad():
        batch = collator_for(model)(examples)
        return float(empirical_nll(task, _forward_logits(model, batch, task), batch).mean())


def test_the_probe_is_repeatable_whatever_the_callers_random_state_and_leaves_it_alone():
    """Dropout on: the probe's draws come from its own seed, so two candidates are compared on the same draws
    however much randomness the caller used in between, and the caller's stream is not advanced."""
    from conftest import random_score_mask
    from sparsepeft.selection.probe import probe_loss

    model = make_model("bert")
    assert model.config.hidden_dropout_prob > 0
    data, held_out = make_examples(32), make_examples(8, seed=9)
    mask = random_score_mask(model, ratio=0.05)
    config = IRDConfig(probe_steps=3, probe_batch_size=8, probe_lr=1e-2, seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        losses.append(probe_loss(model, data, mask, held_out, config))
        after_probe = torch.rand(3)
        torch.manual_seed(caller_seed)
        assert torch.equal(after_probe, torch.rand(3))  # the caller's stream is where it was
    assert losses[0] == losses[1]
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    other = probe_loss(model, data, mask, held_out, IRDConfig(probe_steps=3, probe_batch_size=8, probe_lr=1e-2, seed=5))
    assert other != losses[0]  # the seed does reach the draws (dropout, batch order)
