"""The sparse-delta engine: same weights as the dense-mask engine, O(k) state, exact delta checkpoints."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from conftest import assert_only_mask_moved, make_examples, make_model, random_score_mask
from sparsepeft import DeltaMismatchError, DenseMaskEngine, SparseDeltaEngine, SparseMaskCallback, apply_delta
from sparsepeft.data.collate import PaddingCollator
from sparsepeft.engines import optimizer_state_bytes


_mask = random_score_mask


def _batches(n=10, size=4, seed=3):
    examples = make_examples(n * size, seed=seed)
    collate = PaddingCollator(0)
    return [collate(examples[i * size : (i + 1) * size]) for i in range(n)]


def _loop(model, engine_cls, mask, steps=50, accumulate=1):
    return _train(model, engine_cls(model, mask).attach(), steps, accumulate)


def _train(model, engine, steps=50, accumulate=1):
    """AdamW steps through an attached engine (clipped, optionally accumulated); returns (engine, optimizer)."""
    optimizer = torch.optim.AdamW(engine.trainable_parameters(), lr=5e-3, weight_decay=0.1)
    engine.attach_optimizer(optimizer)
    batches = _batches()
    model.train()
    torch.manual_seed(11)
    for step in range(steps):
        for micro in range(accumulate):
            (model(**batches[(step * accumulate + micro) % len(batches)]).loss / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return engine, optimizer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sparse_engine_ends_at_the_dense_mask_engines_weights(accumulate):
    dense_model, sparse_model = make_model("bert"), make_model("bert")
    mask = _mask(dense_model)
    _loop(dense_model, DenseMaskEngine, mask, accumulate=accumulate)
    engine, _ = _loop(sparse_model, SparseDeltaEngine, mask, accumulate=accumulate)
    engine.detach()
    worst = max(float((a - b).detach().abs().max()) for a, b in zip(dense_model.parameters(), sparse_model.parameters()))
    assert worst < 1e-6
    assert dict(sparse_model.named_parameters()).keys() == dict(dense_model.named_parameters()).keys()


def test_state_is_proportional_to_the_mask_and_frozen_entries_stay():
    model = make_model("bert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = _mask(model, ratio=0.02)
    engine, optimizer = _loop(model, SparseDeltaEngine, mask, steps=3)
    whole = sum(mask.kept(n) for n in mask.shapes if mask.kept(n) and mask.is_full(n))
    partial = mask.num_selected - whole
    # AdamW: two fp32 moments per trained entry, plus one step counter per tensor
    n_tensors = sum(1 for _ in engine.trainable_parameters())
    assert optimizer_state_bytes(optimizer) == 2 * 4 * mask.num_selected + 4 * n_tensors
    assert engine.trainable_state_bytes() == 4 * whole + (4 + 8) * partial
    for name, param in model.named_parameters():
        if name.endswith(("_sparse_values",)):
            continue
        keep = mask.dense(name)
        assert torch.equal(param.detach()[~keep], before[name][~keep]), name
        assert param.grad is None  # no dense gradient survives the backward pass


def test_delta_round_trip_is_bit_exact_and_small(tmp_path):
    model = make_model("bert")
    mask = _mask(model, ratio=0.02)
    engine, _ = _loop(model, SparseDeltaEngine, mask, steps=5)
    size = engine.save_delta(tmp_path / "delta.safetensors")
    engine.detach()
    header_length = int.from_bytes((tmp_path / "delta.safetensors").read_bytes()[:8], "little")
    whole = sum(mask.kept(n) for n in mask.shapes if mask.kept(n) and mask.is_full(n))
    # payload: int32 index + fp32 value per partly-trained entry, fp32 per whole-trained entry; no more
    assert size - 8 - header_length == 8 * (mask.num_selected - whole) + 4 * whole
    rebuilt = apply_delta(make_model("bert"), tmp_path / "delta.safetensors")
    for (name, a), (_, b) in zip(model.named_parameters(), rebuilt.named_parameters()):
        assert torch.equal(a, b), name


def test_delta_on_the_wrong_base_is_refused(tmp_path):
    model = make_model("bert")
    engine, _ = _loop(model, SparseDeltaEngine, _mask(model), steps=2)
    engine.save_delta(tmp_path / "delta.safetensors")
    with pytest.raises(DeltaMismatchError, match="other parameter names or shapes"):
        apply_delta(make_model("gpt2"), tmp_path / "delta.safetensors")
    with pytest.raises(DeltaMismatchError, match="weights differ"):
        apply_delta(make_model("bert", seed=5), tmp_path / "delta.safetensors")
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "delta.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt"):
        apply_delta(make_model("bert"), tmp_path / "bad.safetensors")


def test_merged_model_saves_and_loads_with_from_pretrained(tmp_path):
    model = make_model("bert")
    engine, _ = _loop(model, SparseDeltaEngine, _mask(model), steps=3)
    merged = engine.detach()
    merged.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    merged.eval()
    batch = _batches(1)[0]
    batch.pop("labels")
    assert torch.equal(merged(**batch).logits, loaded(**batch).logits)


def _trainer(model, mask, out, **overrides):
    args = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
                max_grad_norm=0.5, num_train_epochs=2, report_to="none", disable_tqdm=True, use_cpu=True,
                logging_strategy="no", save_strategy="no", seed=3, data_seed=3, dataloader_pin_memory=False)
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=make_examples(24, seed=4),
                   data_collator=PaddingCollator(0), callbacks=[SparseMaskCallback(mask, engine="sparse")])


def test_trainer_sparse_engine_matches_dense_mask_and_resumes(tmp_path):
    dense = make_model("bert")
    mask = _mask(dense)
    Trainer(model=dense, args=_trainer(make_model("bert"), mask, tmp_path / "x").args,
            train_dataset=make_examples(24, seed=4), data_collator=PaddingCollator(0),
            callbacks=[SparseMaskCallback(mask)]).train()
    straight = make_model("bert")
    _trainer(straight, mask, tmp_path / "a", gradient_accumulation_steps=2).train()
    assert (tmp_path / "a" / "sparse_delta.safetensors").is_file()
    interrupted = make_model("bert")
    _trainer(interrupted, mask, tmp_path / "b", gradient_accumulation_steps=2, save_strategy="steps", save_steps=2).train()
    assert (tmp_path / "b" / "checkpoint-2" / "sparse_delta.safetensors").is_file()
    resumed = make_model("bert")
    _trainer(resumed, mask, tmp_path / "b", gradient_accumulation_steps=2, save_strategy="steps", save_steps=2).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name  # resume is bit-identical
    single = make_model("bert")
    _trainer(single, mask, tmp_path / "c").train()
    for (name, a), (_, b) in zip(dense.named_parameters(), single.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_trainer_sparse_engine_under_bf16_only_moves_the_mask(tmp_path):
    model = make_model("bert")
    mask = _mask(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trainer(model, mask, tmp_path, bf16=True).train()
    assert_only_mask_moved(before, model, mask, min_moved_fraction=0.5)
    assert not any(n.endswith("_sparse_values") for n, _ in model.named_parameters())  # detached at train end


def test_a_delta_loads_into_a_base_whose_fresh_head_was_initialised_differently(tmp_path):
    """Loading a base checkpoint into a sequence-classification class draws a new random head each time; the
    delta stores a whole-trained head in full, so the base check must ignore it (and only it)."""
    model = make_model("bert")
    mask = _mask(model)
    assert mask.is_full("classifier.weight") and mask.is_full("classifier.bias")
    engine, _ = _loop(model, SparseDeltaEngine, mask, steps=3)
    engine.save_delta(tmp_path / "delta.safetensors")
    engine.detach()
    base = make_model("bert")
    with torch.no_grad():
        base.classifier.weight.normal_(0, 1.0)  # another draw of the new head, as from_pretrained gives
        base.classifier.bias.fill_(0.3)
    rebuilt = apply_delta(base, tmp_path / "delta.safetensors")
    for (name, a), (_, b) in zip(model.named_parameters(), rebuilt.named_parameters()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        base.bert.pooler.dense.bias.add_(1e-3)  # any other tensor differing is still refused
    with pytest.raises(DeltaMismatchError, match="weights differ"):
        apply_delta(base, tmp_path / "delta.safetensors")


def test_attach_and_training_read_no_weight_and_the_first_save_hashes_once(tmp_path, monkeypatch):
    from sparsepeft.engines import delta

    hashed = []
    real = delta._hash_tensor
    monkeypatch.setattr(delta, "_hash_tensor", lambda digest, name, value: (hashed.append(name), real(digest, name, value)))
    model = make_model("bert")
    engine, _ = _loop(model, SparseDeltaEngine, _mask(model, ratio=0.02), steps=2)
    assert hashed == []  # attach and training steps never copy a weight to the host
    engine.save_delta(tmp_path / "a.safetensors")
    first = len(hashed)
    assert first > 0
    engine.save_delta(tmp_path / "b.safetensors")  # the frozen entries cannot have changed: hash kept
    assert len(hashed) == first


def test_frozen_entry_hash_refuses_another_base_and_accepts_one_that_differs_only_where_trained(tmp_path):
    model = make_model("bert")
    mask = _mask(model, ratio=0.02)
    engine, _ = _loop(model, SparseDeltaEngine, mask, steps=3)
    engine.save_delta(tmp_path / "delta.safetensors")
    engine.detach()
    other = make_model("bert")
    name = next(n for n in mask.indices if not mask.is_full(n))
    with torch.no_grad():  # the entries the delta overwrites are not part of the base's identity
        dict(other.named_parameters())[name].view(-1)[mask.indices[name]] += 1.0
    rebuilt = apply_delta(other, tmp_path / "delta.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), rebuilt.parameters()))
    moved = make_model("bert")
    frozen = (~mask.dense(name)).nonzero()[0]
    with torch.no_grad():  # one frozen entry of another value: another base
        dict(moved.named_parameters())[name][tuple(frozen)] += 1e-3
    with pytest.raises(DeltaMismatchError, match="weights differ"):
        apply_delta(moved, tmp_path / "delta.safetensors")


def test_a_delta_written_before_the_hash_scope_is_still_checked_against_the_whole_base(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from sparsepeft.engines.delta import DELTA_HEADER_KEY, base_content_hash, fully_trained

    model = make_model("bert")
    mask = _mask(model, ratio=0.02)
    legacy_hash = base_content_hash(model, skip=fully_trained(mask))  # what attach used to compute
    engine, _ = _loop(model, SparseDeltaEngine, mask, steps=2)
    engine.save_delta(tmp_path / "new.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as handle:
        header = json.loads(handle.metadata()[DELTA_HEADER_KEY])
    header.pop("base_hash_scope")
    header["base_hash"] = legacy_hash
    save_file(load_file(tmp_path / "new.safetensors"), str(tmp_path / "old.safetensors"),
              metadata={DELTA_HEADER_KEY: json.dumps(header)})
    engine.detach()
    rebuilt = apply_delta(make_model("bert"), tmp_path / "old.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), rebuilt.parameters()))
    with pytest.raises(DeltaMismatchError, match="weights differ"):
        apply_delta(make_model("bert", seed=5), tmp_path / "old.safetensors")


@pytest.mark.parametrize("engine_cls,ratio", [(SparseDeltaEngine, 0.02), (DenseMaskEngine, 0.02),
                                              (DenseMaskEngine, 0.5)])  # 0.5: the dense-mask's boolean form
def test_engines_follow_the_model_through_a_meta_round_trip_and_a_dtype_move(engine_cls, ratio):
    mask = _mask(make_model("bert"), ratio=ratio)
    reference = make_model("bert").double()  # moved before attach
    _train(reference, engine_cls(reference, mask).attach(), steps=4)
    moved = make_model("bert")
    engine = engine_cls(moved, mask).attach()
    tensors = lambda: [*moved.named_parameters(), *moved.named_buffers()]  # noqa: E731 (non-persistent too)
    saved = {name: value.detach().clone() for name, value in tensors()}
    moved.to("meta")  # e.g. a loader that materialises later: buffers and weights are replaced
    moved.to_empty(device="cpu")
    with torch.no_grad():
        for name, value in tensors():
            value.copy_(saved[name])
    moved.double()  # attached in float32, trained in float64
    _train(moved, engine, steps=4)
    for (name, a), (_, b) in zip(reference.named_parameters(), moved.named_parameters()):
        assert torch.equal(a, b), name


def test_applying_a_delta_twice_says_so(tmp_path):
    model = make_model("bert")
    engine, _ = _loop(model, SparseDeltaEngine, _mask(model), steps=2)
    engine.save_delta(tmp_path / "delta.safetensors")
    engine.detach()
    once = apply_delta(make_model("bert"), tmp_path / "delta.safetensors")
    with pytest.raises(DeltaMismatchError, match="already holds every value"):
        apply_delta(once, tmp_path / "delta.safetensors")


@pytest.mark.parametrize("damage, message", [
    ("negative", "fall outside"), ("beyond", "fall outside"), ("nan", "NaN/inf"), ("nan_dense", "NaN/inf"),
    ("count", "indices but"),
])
def test_a_damaged_delta_is_refused_and_the_model_is_left_as_it_was(tmp_path, damage, message):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = make_model("bert")
    engine, _ = _loop(model, SparseDeltaEngine, _mask(model), steps=2)
    engine.save_delta(tmp_path / "delta.safetensors")
    with safe_open(str(tmp_path / "delta.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    index_key = next(k for k in tensors if k.endswith("::indices"))
    dense_key = next(k for k in tensors if k.endswith("::dense"))
    if damage == "negative":
        tensors[index_key][0] = -1  # used to write another entry silently
    elif damage == "beyond":
        tensors[index_key][-1] = 10**6
    elif damage == "nan":
        tensors[index_key.replace("::indices", "::values")][0] = float("nan")
    elif damage == "nan_dense":
        tensors[dense_key].view(-1)[0] = float("inf")
    else:
        tensors[index_key] = tensors[index_key][:-1]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    base = make_model("bert")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(ValueError, match=message):
        apply_delta(base, tmp_path / "bad.safetensors")
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    assert json.loads(metadata["sparsepeft_delta"])["base_hash_scope"] == "frozen-entries"
