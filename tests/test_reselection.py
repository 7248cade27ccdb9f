"""Re-selection during training (SpIEL-style drop and grow) on the sparse engine, against a dense slow reference."""

import json

import pytest
import torch

from conftest import make_examples, make_model, no_dropout
from sparsepeft import SparseDeltaEngine, select_mask
from sparsepeft.data.collate import PaddingCollator
from sparsepeft.engines.reselection import ReselectionConfig, ReselectionError, Reselector

LR, DECAY, STEPS = 1e-2, 0.1, 10
CONFIG = ReselectionConfig(every=3, accumulation=2, rate=0.5)


def _setup():
    model = no_dropout(make_model("bert")).double()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layer." in n]
    g = torch.Generator().manual_seed(3)
    scores = {f"{n}.weight": torch.rand(model.get_submodule(n).weight.shape, generator=g) for n in linear}
    scores.update({n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters() if n.startswith("classifier")})
    mask = select_mask(scores, 0.1, model=model)
    examples = make_examples(24, lengths=(6, 14), seed=4)
    batches = [PaddingCollator(0)(examples[i:i + 4]) for i in range(0, 24, 4)]
    return model, mask, batches


def _train_with_engine(model, mask, batches, micro: int = 1):
    engine = SparseDeltaEngine(model, mask).attach()
    optimizer = torch.optim.AdamW(list(engine.trainable_parameters()), lr=LR, weight_decay=DECAY)
    engine.attach_optimizer(optimizer)
    reselector = Reselector(engine, CONFIG).attach(optimizer, total_steps=STEPS)
    for step in range(STEPS):
        for m in range(micro):
            (model(**batches[(step * micro + m) % len(batches)]).loss / micro).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state_sizes = {name: [t.numel() for t in optimizer.state[part.values].values() if t.dim()]
                   for name, part in engine.partial.items()}
    reselector.detach()
    engine.detach()
    return reselector, state_sizes


def _train_reference(model, mask, batches, micro: int = 1):
    """The same schedule written densely: every weight under one AdamW whose gradients are zeroed outside the mask
    (weight decay applied by hand to the trained entries only), boolean masks, candidates from the whole gradient of
    the window's first backward (its first micro-batch under gradient accumulation, as SpIEL's hook does), scored
    by the steps' gradients."""
    params = dict(model.named_parameters())
    keep = {n: torch.zeros(p.numel(), dtype=torch.bool) for n, p in params.items()}
    for n, idx in mask.indices.items():
        keep[n][idx] = True
    partial = [n for n in mask.indices if 0 < mask.kept(n) < params[n].numel()]
    base = {n: p.detach().clone().reshape(-1) for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=LR, weight_decay=0.0)
    candidates, moved = {}, 0
    for step in range(1, STEPS + 1):
        window = step < STEPS and (step - 1) % CONFIG.every >= CONFIG.every - CONFIG.accumulation
        model.zero_grad(set_to_none=True)
        for m in range(micro):
            (model(**batches[((step - 1) * micro + m) % len(batches)]).loss / micro).backward()
            for n in partial if window else ():
                if n not in candidates:
                    top = torch.topk(params[n].grad.reshape(-1).abs(), int(keep[n].sum())).indices
                    candidates[n] = [top, 0.0, 0.0, 0]
        with torch.no_grad():
            for n in partial if window else ():
                g = params[n].grad.reshape(-1)
                entry = candidates[n]
                entry[1], entry[2], entry[3] = entry[1] + g[entry[0]], entry[2] + g[entry[0]] ** 2, entry[3] + 1
            for n, p in params.items():
                p.grad.view(-1)[~keep[n]] = 0
                p.view(-1)[keep[n]] *= 1 - LR * DECAY
        optimizer.step()
        if window and step % CONFIG.every == 0:
            share = CONFIG.rate * (1 - step / STEPS)
            with torch.no_grad():
                for n in partial:
                    moved += _reference_swap(params[n], base[n], keep[n], candidates[n], share, optimizer)
            candidates.clear()
    return {n: torch.nonzero(k).flatten() for n, k in keep.items() if k.any()}, moved


def _reference_swap(param, base, keep, entry, share, optimizer):
    kept = torch.nonzero(keep).flatten()
    n = int(share * kept.numel())
    if n == 0:
        return 0
    w = param.detach().view(-1)
    change = (w[kept] - base[kept]).abs()
    leaving = kept[torch.sort(change, stable=True).indices[:n]]
    staying = keep.clone()
    staying[leaving] = False
    index, total, squares, steps = entry
    free = ~staying[index]
    pool, total, squares = index[free], total[free], squares[free]
    best = torch.topk(total.abs(), min(n, pool.numel())).indices
    joining, total, squares = pool[best], total[best], squares[best]
    rejoins, stays = torch.isin(joining, leaving), torch.isin(leaving, joining)
    joining, total, squares = joining[~rejoins], total[~rejoins], squares[~rejoins]
    leaving = leaving[~stays][: joining.numel()]
    w[leaving] = base[leaving]
    keep[leaving], keep[joining] = False, True
    state = optimizer.state[param]
    for key in ("exp_avg", "exp_avg_sq"):
        state[key].view(-1)[leaving] = 0
    state["exp_avg"].view(-1)[joining] = total / steps
    state["exp_avg_sq"].view(-1)[joining] = squares / steps
    return joining.numel()


def test_reselection_matches_a_dense_reference_and_leaves_everything_outside_the_mask_at_its_base_value():
    model, mask, batches = _setup()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    counts = {n: mask.kept(n) for n in mask.indices}
    reference_model = no_dropout(make_model("bert")).double()
    reference_mask, reference_moved = _train_reference(reference_model, mask, batches)
    start = {n: idx.clone() for n, idx in mask.indices.items()}
    reselector, state_sizes = _train_with_engine(model, mask, batches)

    stats = reselector.stats()
    assert [h["step"] for h in stats["history"]] == [3, 6, 9]
    assert stats["entries_moved"] == reference_moved > 0  # entries did move: the test is not of a fixed mask
    assert any(not torch.equal(start[n], mask.indices[n]) for n in mask.indices)
    for name, idx in mask.indices.items():
        assert idx.numel() == counts[name], f"{name}: the budget of a tensor changed"
        assert bool((idx[1:] > idx[:-1]).all()), f"{name}: the mask's indices are no longer sorted"
        assert torch.equal(idx, reference_mask[name]), f"{name}: another selection than the reference's"
    params = dict(model.named_parameters())
    for name, param in reference_model.named_parameters():
        torch.testing.assert_close(params[name], param, rtol=1e-9, atol=1e-12)
        outside = torch.ones(param.numel(), dtype=torch.bool)
        if name in mask.indices:
            outside[mask.indices[name]] = False
        assert torch.equal(params[name].detach().reshape(-1)[outside], base[name].reshape(-1)[outside]), \
            f"{name}: an entry outside the final mask is not its base value, bit for bit"
    for name, sizes in state_sizes.items():  # AdamW's moments stay the size of the value vectors: O(k)
        assert sizes == [counts[name], counts[name]], name


def test_under_gradient_accumulation_candidates_come_from_the_first_micro_batch_and_steps_are_scored_whole():
    model, mask, batches = _setup()
    reference_model = no_dropout(make_model("bert")).double()
    reference_mask, reference_moved = _train_reference(reference_model, mask, batches, micro=2)
    reselector, _ = _train_with_engine(model, mask, batches, micro=2)
    assert reselector.stats()["entries_moved"] == reference_moved > 0
    for name, idx in mask.indices.items():
        assert torch.equal(idx, reference_mask[name]), name
    params = dict(model.named_parameters())
    for name, param in reference_model.named_parameters():
        torch.testing.assert_close(params[name], param, rtol=1e-9, atol=1e-12)


def test_one_swap_by_hand():
    """Ten entries, four trained (changes 0, 0.1, 0.5, 0.9), half swapped: entries 0 and 1 moved least and leave;
    candidates 0 and 5 have the largest gradients. 0 is both leaving and joining, so it stays, and only 1 gives its
    place to 5, whose AdamW moments start at the mean and mean square of its two step gradients (9 and 21)."""
    from sparsepeft import SparseMask
    from sparsepeft.engines.reselection import _Candidates

    model = torch.nn.Sequential(torch.nn.Linear(1, 10, bias=False)).double()
    base = model[0].weight.detach().clone().reshape(-1)
    mask = SparseMask(shapes={"0.weight": (10, 1)}, indices={"0.weight": torch.tensor([0, 1, 2, 3])})
    engine = SparseDeltaEngine(model, mask).attach()
    optimizer = torch.optim.AdamW(list(engine.trainable_parameters()), lr=0.0)
    engine.attach_optimizer(optimizer)
    model(torch.ones(1, 1, dtype=torch.float64)).sum().backward()
    optimizer.step()  # AdamW's state exists; lr 0 moved nothing
    reselector = Reselector(engine, ReselectionConfig(every=1, accumulation=1, rate=1.0))
    reselector.attach(optimizer, total_steps=2, start_step=1)  # at step 1 of 2: half the entries are swapped
    values = engine.partial["0.weight"].values
    with torch.no_grad():
        values += torch.tensor([0.0, 0.1, 0.5, 0.9], dtype=torch.float64)
    engine._write_back()
    gradient = torch.tensor([4.0, 0, 0, 0, 0, 3, 2, 1, 0, 0], dtype=torch.float64)
    candidates = _Candidates(gradient, 4)
    assert sorted(candidates.index.tolist()) == [0, 5, 6, 7]
    for scale in (3.0, 7.0):
        candidates.add(scale * gradient)
        candidates.end_step()
    reselector.candidates["0.weight"] = candidates
    assert reselector.reselect() == 1
    assert mask.indices["0.weight"].tolist() == [0, 2, 3, 5]
    weight = model[0].weight.detach().reshape(-1)
    assert torch.equal(weight[1], base[1]) and torch.equal(weight[5], base[5])  # left: its base value; joined: untrained
    assert torch.equal(weight[0], base[0]) and weight[3] == base[3] + 0.9  # stayed: what it had
    state = optimizer.state[values]
    slot = mask.indices["0.weight"].tolist().index(5)
    assert state["exp_avg"][slot] == (9 + 21) / 2 and state["exp_avg_sq"][slot] == (81 + 441) / 2
    assert torch.equal(values[slot], base[5]) and reselector.base["0.weight"][slot] == base[5]


def test_candidates_ranked_a_chunk_at_a_time_are_the_whole_tensors_top_k():
    from sparsepeft.engines.reselection import largest_entries

    grad = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0))
    whole = set(torch.topk(grad.reshape(-1).abs(), 500).indices.tolist())
    for chunk in (1 << 24, 4096, 999, 300):
        assert set(largest_entries(grad, 500, chunk=chunk).tolist()) == whole, chunk
    small = torch.tensor([0.5, -3.0, 2.0, 0.1])
    assert sorted(largest_entries(small, 10, chunk=3).tolist()) == [0, 1, 2, 3]  # k above the size: every entry


def test_bad_settings_and_places_are_refused():
    with pytest.raises(ReselectionError, match="--reselect-accumulation must be between 1 and --reselect-every"):
        ReselectionConfig(every=3, accumulation=4)
    with pytest.raises(ReselectionError, match="--reselect-rate"):
        ReselectionConfig(rate=0)
    with pytest.raises(ReselectionError, match="--reselect-every must be at least 1"):
        ReselectionConfig(every=0)
    model, mask, _ = _setup()
    from sparsepeft import DenseMaskEngine

    with pytest.raises(ReselectionError, match="--engine sparse"):
        Reselector(DenseMaskEngine(model, mask).attach(), CONFIG)


FAST = ["--per-device-train-batch-size", "8", "--report-to", "none", "--disable-tqdm", "true", "--use-cpu", "true",
        "--max-seq-length", "48", "--dataloader-pin-memory", "false", "--max-train-samples", "32",
        "--max-eval-samples", "8", "--num-samples", "16", "--keep-ratio", "0.05", "--learning-rate", "1e-2",
        "--num-train-epochs", "2", "--reselect-every", "2", "--reselect-accumulation", "1", "--reselect-rate", "0.5"]


def _cli(model_dir, out, *extra):
    from sparsepeft.cli.main import main

    return main(["train", "--model", str(model_dir), "--task", "demo", "--output-dir", str(out), *FAST, *extra])


def test_the_cli_re_selects_records_it_and_saves_the_final_mask_and_delta(tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from sparsepeft import SparseMask, apply_delta

    out = tmp_path / "run"
    assert _cli(tiny_bert_dir, out, "--save-strategy", "no") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["reselection"]["every"] == 2 and results["reselection"]["reselections"] == 3  # steps 2, 4, 6 of 8
    assert results["reselection"]["entries_moved"] > 0
    assert results["selection_variant"]["reselection"] == {"every": 2, "accumulation": 1, "rate": 0.5}
    final = SparseMask.load(out / "sparse_mask.safetensors")
    assert final.config["reselection"]["every"] == 2
    assert results["mask_allocation"] == final.allocation()
    embedding = "bert.embeddings.word_embeddings.weight"  # its rows in results.json are the final mask's
    rows = set((final.indices[embedding] // 16).tolist()) if final.kept(embedding) else set()
    assert (results["mask_embedding_rows"] or {}).get("rows_with_entries", 0) == len(rows)
    fixed = tmp_path / "fixed"  # the same run with the mask held: the mask re-selection started from
    assert _cli(tiny_bert_dir, fixed, "--save-strategy", "no", "--reselect-every", "0") == 0
    start = SparseMask.load(fixed / "sparse_mask.safetensors")
    assert "reselection" not in start.config
    assert {n: final.kept(n) for n in final.indices} == {n: start.kept(n) for n in start.indices}
    assert any(not torch.equal(final.indices[n], start.indices[n]) for n in final.indices)
    # the base model plus the delta is the saved model, and the delta's entries are the final mask's
    rebuilt = apply_delta(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir),
                          out / "sparse_delta.safetensors")
    saved = load_file(out / "model.safetensors")
    for name, param in rebuilt.state_dict().items():
        if name in saved:
            assert torch.equal(param, saved[name]), name
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).state_dict()
    for name, idx in final.indices.items():
        if 0 < idx.numel() < saved[name].numel():
            outside = torch.ones(saved[name].numel(), dtype=torch.bool)
            outside[idx] = False
            assert torch.equal(saved[name].reshape(-1)[outside], base[name].reshape(-1)[outside]), name


def test_a_resumed_re_selecting_run_ends_where_the_whole_run_does(tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file

    steps = ["--save-strategy", "steps", "--save-steps", "4"]
    assert _cli(tiny_bert_dir, tmp_path / "whole", *steps) == 0
    checkpoint = tmp_path / "whole" / "checkpoint-4"  # saved after step 4's re-selection
    assert _cli(tiny_bert_dir, tmp_path / "resumed", *steps, "--resume-from-checkpoint", str(checkpoint)) == 0
    whole, resumed = (load_file(tmp_path / f / "model.safetensors") for f in ("whole", "resumed"))
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    masks = [(tmp_path / f / "sparse_mask.safetensors").read_bytes() for f in ("whole", "resumed")]
    assert masks[0] == masks[1]


def test_the_best_checkpoint_loads_under_the_mask_it_was_saved_with(tiny_bert_dir, tmp_path):
    """--load-best-model-at-end: the best checkpoint holds an earlier mask than the run's last, which is taken back
    before its delta is loaded; the model saved and scored is that checkpoint's."""
    from safetensors.torch import load_file

    from sparsepeft import SparseMask

    out = tmp_path / "best"
    assert _cli(tiny_bert_dir, out, "--eval-strategy", "steps", "--eval-steps", "1", "--save-strategy", "steps",
                "--save-steps", "1", "--load-best-model-at-end", "true", "--metric-for-best-model", "loss",
                "--learning-rate", "5e-2") == 0
    results = json.loads((out / "results.json").read_text())
    losses = [point["loss"] for point in results["validation_log"]]
    best = out / f"checkpoint-{1 + losses.index(min(losses))}"
    at_best, last = (SparseMask.load(f / "sparse_mask.safetensors") for f in (best, out / "checkpoint-8"))
    assert any(not torch.equal(at_best.indices[n], last.indices[n]) for n in last.indices), \
        "the best checkpoint's mask is the last one: this run does not test taking an earlier mask back"
    assert results["metrics"]["validation"]["loss"] == pytest.approx(min(losses), rel=1e-5)
    final = SparseMask.load(out / "sparse_mask.safetensors")
    assert all(torch.equal(final.indices[n], at_best.indices[n]) for n in final.indices)
    saved, checkpoint = load_file(out / "sparse_delta.safetensors"), load_file(best / "sparse_delta.safetensors")
    assert saved.keys() == checkpoint.keys() and all(torch.equal(saved[k], checkpoint[k]) for k in saved)


@pytest.mark.parametrize("flags, message", [
    (["--engine", "dense-mask"], "--reselect-every re-selects the entries of a full-model mask on the sparse engine"),
    (["--method", "lora"], "--reselect-every re-selects the entries of a full-model mask"),
    (["--reselect-accumulation", "3"], "--reselect-accumulation must be between 1 and --reselect-every"),
    (["--reselect-rate", "1.5"], "--reselect-rate must be in"),
    (["--reselect-every", "-1"], "--reselect-every must be 0"),
], ids=["dense-mask", "lora", "accumulation", "rate", "negative"])
def test_the_cli_refuses_re_selection_where_it_cannot_run_before_writing(tiny_bert_dir, tmp_path, capsys, flags,
                                                                       message):
    out = tmp_path / "refused"
    assert _cli(tiny_bert_dir, out, "--save-strategy", "no", *flags) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()
