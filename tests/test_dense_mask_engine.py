import pytest
import torch

from conftest import assert_only_mask_moved, gradient_support, make_examples, make_model, random_score_mask
from sparsepeft import DenseMaskEngine, select_mask
from sparsepeft.data.collate import PaddingCollator


_mask = random_score_mask


def _batches(n_batches=6, batch_size=4):
    examples = make_examples(n_batches * batch_size, seed=3)
    collate = PaddingCollator(0)
    return [collate(examples[i * batch_size : (i + 1) * batch_size]) for i in range(n_batches)]


def _train(model, engine_or_none, optimizer, batches, autocast_dtype=None, scaler=None, clip=1.0):
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()


@pytest.mark.parametrize("autocast_dtype,use_scaler", [(None, False), (torch.bfloat16, False), (torch.float16, True)])
def test_frozen_entries_bit_identical_under_adamw_decay_clipping_and_autocast(autocast_dtype, use_scaler):
    model = make_model("bert")
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    support = gradient_support(model, _batches())
    engine = DenseMaskEngine(model, mask).attach()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    engine.attach_optimizer(optimizer)
    scaler = torch.amp.GradScaler("cpu") if use_scaler else None
    _train(model, engine, optimizer, _batches(), autocast_dtype, scaler)
    assert_only_mask_moved(before, model, mask, must_move=support)


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05, nesterov=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.05),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, weight_decay=0.05),
    lambda ps: torch.optim.ASGD(ps, lr=1e-2, weight_decay=0.05),  # not zero-update-safe: restore guard
])
def test_other_optimizers_keep_frozen_entries(make_optimizer):
    model = make_model("bert")
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    support = gradient_support(model, _batches())
    engine = DenseMaskEngine(model, mask).attach()
    optimizer = make_optimizer(list(model.parameters()))
    engine.attach_optimizer(optimizer)
    _train(model, engine, optimizer, _batches())
    assert_only_mask_moved(before, model, mask, must_move=support)


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
])
def test_momentum_gathered_before_the_mask_does_not_move_frozen_entries(make_optimizer):
    """A mask attached mid-training (after dense warm-up steps) must not let old momentum move frozen entries."""
    model = make_model("bert")
    optimizer = make_optimizer(list(model.parameters()))
    _train(model, None, optimizer, _batches(n_batches=2))  # dense steps: every entry has momentum now
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = DenseMaskEngine(model, mask).attach()
    engine.attach_optimizer(optimizer)
    _train(model, engine, optimizer, _batches()[2:])
    assert_only_mask_moved(before, model, mask)


def test_full_mask_reproduces_plain_adamw_exactly():
    batches = _batches()
    plain = make_model("bert")
    masked = make_model("bert")
    full = select_mask({n: torch.rand(p.shape) for n, p in masked.named_parameters()}, keep_ratio=1.0, model=masked)
    engine = DenseMaskEngine(masked, full).attach()
    opt_masked = torch.optim.AdamW(masked.parameters(), lr=1e-2, weight_decay=0.1)
    engine.attach_optimizer(opt_masked)
    torch.manual_seed(7)
    _train(masked, engine, opt_masked, batches)
    torch.manual_seed(7)
    _train(plain, None, torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1), batches)
    for (n, a), (_, b) in zip(plain.named_parameters(), masked.named_parameters()):
        assert torch.equal(a, b), n


def test_trained_entries_follow_adamw_on_the_masked_gradient():
    """One step on a mask equals a hand-computed AdamW update of the kept entries."""
    model = make_model("bert")
    mask = _mask(model)
    batch = _batches(1)[0]
    reference = make_model("bert")
    engine = DenseMaskEngine(model, mask).attach()
    opt = torch.optim.AdamW(engine.trainable_parameters(), lr=1e-2, weight_decay=0.1, eps=1e-8)
    engine.attach_optimizer(opt)
    model.train(), reference.train()
    torch.manual_seed(5)
    model(**batch).loss.backward()
    opt.step()
    torch.manual_seed(5)
    reference(**batch).loss.backward()
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        keep = mask.dense(name)
        if not keep.any():
            assert torch.equal(p.detach(), r.detach())
            continue
        g = r.grad * keep
        step = 1e-2 * g / (g.abs() + 1e-8)  # first AdamW step: m/(sqrt(v)+eps) with bias correction
        expected = torch.where(keep, r.detach() * (1 - 1e-2 * 0.1) - step, r.detach())
        assert torch.allclose(p.detach(), expected, atol=1e-6), name


def test_unselected_tensors_are_frozen_and_detach_restores():
    model = make_model("bert")
    mask = _mask(model, ratio=0.01)
    with DenseMaskEngine(model, mask) as engine:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(mask.kept(n) == 0 for n in frozen)
        assert sum(1 for _ in engine.trainable_parameters()) == len(mask.indices)
    assert all(p.requires_grad for p in model.parameters())


def test_engine_refuses_a_mask_of_another_model():
    with pytest.raises(ValueError, match="another model"):
        DenseMaskEngine(make_model("gpt2"), _mask(make_model("bert")))


def test_clipping_sees_only_the_masked_gradient():
    """The norm clipping measures is that of the full gradient with the frozen entries zeroed, computed here
    independently on a model with no engine (a gradient masked after clipping would give the full norm)."""
    reference = make_model("bert").eval()
    model = make_model("bert").eval()
    mask = _mask(model)
    batch = _batches(1)[0]
    reference(**batch).loss.backward()
    masked_squares = sum(float((p.grad.double() * mask.dense(n)).square().sum())
                         for n, p in reference.named_parameters() if p.grad is not None)
    full_norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9))
    DenseMaskEngine(model, mask).attach()
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        if param.grad is None:
            assert mask.kept(name) == 0
    clipped_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    assert clipped_norm == pytest.approx(masked_squares**0.5, rel=1e-5)
    assert clipped_norm != pytest.approx(full_norm, rel=1e-3)  # the two norms differ: the check can tell


@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),  # decoupled decay on the trained entries
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05),  # decay as a gradient term
    lambda ps: torch.optim.ASGD(ps, lr=1e-2, weight_decay=0.05),  # the restore guard
])
def test_dense_masks_as_booleans_train_exactly_as_indices(make_optimizer, monkeypatch):
    """Half-trained tensors (FISH-Tuning's LoRA factors) hold a boolean mask, one kernel per use instead of a
    gather and a scatter; the weights must come out bit for bit as with indices."""
    from sparsepeft.engines import dense_mask

    def trained(force_indices: bool):
        model = make_model("bert")
        mask = _mask(model, ratio=0.5)
        if force_indices:
            monkeypatch.setattr(dense_mask.FollowingIndex, "for_entries",
                                classmethod(lambda cls, indices, numel, device="cpu": cls(indices, device)))
        engine = DenseMaskEngine(model, mask).attach()
        forms = {n: entries.is_mask for n, entries in engine.partial.items()}
        optimizer = make_optimizer(list(engine.trainable_parameters()))
        engine.attach_optimizer(optimizer)
        _train(model, engine, optimizer, _batches())
        monkeypatch.undo()
        return model, mask, forms

    as_masks, mask, forms = trained(False)
    as_indices, _, index_forms = trained(True)
    assert any(forms.values()) and not any(index_forms.values())
    for (name, a), (_, b) in zip(as_masks.named_parameters(), as_indices.named_parameters()):
        assert torch.equal(a, b), name
    assert_only_mask_moved({n: p.detach() for n, p in make_model("bert").named_parameters()}, as_masks, mask)
