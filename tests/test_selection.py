import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_examples, make_model
from sparsepeft import MaskMismatchError, SparseMask, estimate_fisher, random_mask, select_mask
from sparsepeft.selection.topk import budget_for


def _scores(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}


def test_global_topk_keeps_exactly_the_budget_with_head_inside():
    model = make_model("bert")
    scores = _scores(model)
    total = sum(s.numel() for s in scores.values())
    mask = select_mask(scores, keep_ratio=0.05, model=model)
    assert mask.num_selected == budget_for(0.05, total)
    assert mask.is_full("classifier.weight") and mask.is_full("classifier.bias")
    kept_scores = torch.cat([scores[n].reshape(-1)[i] for n, i in mask.indices.items() if "classifier" not in n])
    dropped = torch.cat([scores[n].reshape(-1)[torch.tensor(sorted(set(range(scores[n].numel())) - set(mask.indices.get(n, torch.empty(0)).tolist())), dtype=torch.long)]
                         for n in scores if "classifier" not in n])
    assert kept_scores.min() >= dropped.max()


def test_ties_are_broken_by_position_deterministically():
    scores = {"a.weight": torch.ones(10), "b.weight": torch.ones(10)}
    mask = select_mask(scores, keep_ratio=0.25, always_train=())
    assert mask.indices["a.weight"].tolist() == [0, 1, 2, 3, 4]
    assert "b.weight" not in mask.indices
    again = select_mask({k: v.clone() for k, v in scores.items()}, keep_ratio=0.25, always_train=())
    assert {k: v.tolist() for k, v in again.indices.items()} == {k: v.tolist() for k, v in mask.indices.items()}


def test_per_tensor_spends_the_same_budget_in_proportion():
    model = make_model("bert")
    scores = _scores(model)
    glob = select_mask(scores, keep_ratio=0.1)
    per = select_mask(scores, keep_ratio=0.1, strategy="per_tensor")
    assert per.num_selected == glob.num_selected
    word = "bert.embeddings.word_embeddings.weight"
    free = glob.num_selected - sum(scores[n].numel() for n in scores if "classifier" in n)
    ranked_total = sum(s.numel() for n, s in scores.items() if "classifier" not in n)
    assert abs(per.kept(word) - free * scores[word].numel() / ranked_total) <= 1


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_keep_ratio_outside_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        select_mask({"w": torch.rand(10)}, keep_ratio=ratio)


def test_budget_smaller_than_head_is_refused():
    with pytest.raises(ValueError, match="always-trained"):
        select_mask({"classifier.weight": torch.rand(100), "x.weight": torch.rand(100)}, keep_ratio=0.1)


def test_random_mask_has_the_same_budget_and_depends_on_seed():
    model = make_model("bert")
    fish = select_mask(_scores(model), 0.05, model=model)
    r0, r1 = random_mask(model, 0.05, seed=0), random_mask(model, 0.05, seed=1)
    assert r0.num_selected == fish.num_selected == r1.num_selected
    assert any(not torch.equal(r0.indices.get(n, torch.empty(0)), r1.indices.get(n, torch.empty(0))) for n in r0.shapes)


def test_save_load_round_trip(tmp_path):
    model = make_model("bert")
    mask = select_mask(_scores(model), 0.05, model=model, config={"num_samples": 12})
    mask.save(tmp_path / "mask.safetensors")
    loaded = SparseMask.load(tmp_path / "mask.safetensors")
    assert loaded.shapes == mask.shapes and loaded.fingerprint == mask.fingerprint
    assert loaded.config["num_samples"] == 12
    assert set(loaded.indices) == set(mask.indices)
    assert all(torch.equal(loaded.indices[n], mask.indices[n]) for n in mask.indices)
    assert loaded.layer_counts() == mask.layer_counts()
    assert [p.name for p in tmp_path.iterdir()] == ["mask.safetensors"]  # no temporary file left behind
    loaded.check_compatible(model)


def test_counts_by_layer_and_module_type_add_up():
    model = make_model("bert")
    mask = select_mask(_scores(model), 0.05, model=model)
    for counts in (mask.layer_counts(), mask.module_type_counts(), mask.tensor_counts()):
        assert sum(k for k, _ in counts.values()) == mask.num_selected
        assert sum(t for _, t in counts.values()) == mask.num_candidates
    assert {"layer 0", "layer 1", "embeddings", "head"} <= set(mask.layer_counts())
    assert "attention.self.query" in mask.module_type_counts()


def test_mask_for_another_model_is_refused():
    mask = select_mask(_scores(make_model("bert")), 0.05, model=make_model("bert"))
    with pytest.raises(MaskMismatchError, match="another model"):
        mask.check_compatible(make_model("gpt2"))
    bigger = make_model("bert", num_labels=3)
    with pytest.raises(MaskMismatchError, match="shape differs"):
        mask.check_compatible(bigger)
    deeper = make_model("bert", layers=3)  # holds every masked tensor, and a block the mask never saw
    with pytest.raises(MaskMismatchError, match="fingerprint mismatch"):
        mask.check_compatible(deeper)
    mask.check_compatible(make_model("bert", seed=5))  # same architecture, other weights: accepted


def test_corrupt_or_foreign_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        SparseMask.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a sparsepeft mask"):
        SparseMask.load(tmp_path / "other.safetensors")
    header = {"format_version": 1, "shapes": {"w": [4]}, "fingerprint": None, "config": {}, "num_selected": 1}
    save_file({"w": torch.tensor([9], dtype=torch.int32)}, str(tmp_path / "bad.safetensors"),
              metadata={"sparsepeft_mask": json.dumps(header)})
    with pytest.raises(ValueError, match="outside"):
        SparseMask.load(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        SparseMask.load(tmp_path / "missing.safetensors")


def test_density_plot_is_a_png(tmp_path):
    model = make_model("llama-lm")
    mask = select_mask(_scores(model), 0.05, model=model, always_train=())
    mask.plot(tmp_path / "density.png")
    assert (tmp_path / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _concatenated_topk(scores, k):
    """The reference: one concatenated ranking, ties to the lowest global position."""
    names = list(scores)
    flat = torch.cat([torch.nan_to_num(scores[n].reshape(-1).double(), nan=float("-inf")) for n in names])
    order = torch.sort(-flat, stable=True).indices[:k]  # descending score, ties in position order
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    out, start = {}, 0
    for name in names:
        out[name] = chosen[start:start + scores[name].numel()].nonzero().flatten()
        start += scores[name].numel()
    return out


@pytest.mark.parametrize("chunk", [1 << 20, 7])  # 7: every tensor is ranked in several chunks
@pytest.mark.parametrize("seed", range(4))
def test_streamed_global_topk_equals_one_concatenated_ranking(seed, chunk, monkeypatch):
    from sparsepeft.selection import topk
    from sparsepeft.selection.topk import global_topk

    monkeypatch.setattr(topk, "CHUNK", chunk)

    g = torch.Generator().manual_seed(seed)
    scores = {"a": torch.randint(0, 5, (7, 9), generator=g).float(),  # many ties
              "b": torch.randint(0, 5, (40,), generator=g).double(),  # another dtype
              "c": torch.rand(3, 11, generator=g),
              "d": torch.randint(0, 3, (13,), generator=g).float()}
    scores["c"][0, :4] = float("nan")  # NaN ranks lowest
    total = sum(v.numel() for v in scores.values())  # 149
    for k in (1, 5, 37, 100, 145, 149, 160):  # 145: into the NaNs' -inf tie
        streamed, reference = global_topk(scores, k), _concatenated_topk(scores, k)
        assert sum(int(v.numel()) for v in streamed.values()) == min(k, total)
        for name in scores:
            assert torch.equal(streamed[name], reference[name]), (k, name)


@pytest.mark.parametrize("chunk", [1 << 20, 100])
def test_streamed_global_topk_on_a_real_fisher(chunk, monkeypatch):
    from sparsepeft.selection import topk
    from sparsepeft.selection.topk import global_topk

    monkeypatch.setattr(topk, "CHUNK", chunk)

    model = make_model("bert")
    fisher = estimate_fisher(model, make_examples(12), num_samples=12, progress=False)
    k = round(0.01 * sum(f.numel() for f in fisher.values()))
    streamed, reference = global_topk(fisher, k), _concatenated_topk(fisher, k)
    assert all(torch.equal(streamed[n], reference[n]) for n in fisher)


def _awkward_scores(seed):
    """Negative values, both zeros, infinities, NaN, subnormals, heavy ties, two dtypes, bf16."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(50, 30, generator=g) * 10.0 ** torch.randint(-30, 30, (50, 30), generator=g)
    a.view(-1)[:40] = torch.tensor([0.0, -0.0] * 20)
    a.view(-1)[40:46] = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 3.4e38])
    b = torch.randint(-3, 3, (777,), generator=g).double() * 0.5  # float64: the ranking runs in float64
    c = torch.randn(64, 8, generator=g).to(torch.bfloat16)
    d = -torch.rand(100, generator=g)  # all negative
    return {"a": a, "b": b, "c": c, "d": d}


@pytest.mark.parametrize("chunk", [1 << 22, 97])
@pytest.mark.parametrize("seed", range(3))
def test_radix_select_equals_one_stable_sort_on_awkward_scores(seed, chunk, monkeypatch):
    from sparsepeft.selection import topk
    from sparsepeft.selection.topk import global_topk

    monkeypatch.setattr(topk, "CHUNK", chunk)
    scores = _awkward_scores(seed)
    total = sum(v.numel() for v in scores.values())
    for k in (1, 2, 39, 40, 41, 500, 1500, 2000, 2300, total - 1):
        chosen, reference = global_topk(scores, k), _concatenated_topk(scores, k)
        for name in scores:
            assert torch.equal(chosen[name], reference[name]), (k, name)
    float32_only = {n: v for n, v in scores.items() if v.dtype != torch.float64}  # the float32 (2-pass) path
    for k in (3, 777, 1600):
        chosen, reference = global_topk(float32_only, k), _concatenated_topk(float32_only, k)
        assert all(torch.equal(chosen[n], reference[n]) for n in float32_only), k


def test_per_tensor_topk_equals_a_stable_sort_per_tensor():
    from sparsepeft.selection.topk import per_tensor_topk, proportional_quotas

    scores = _awkward_scores(5)
    quotas = proportional_quotas({n: v.numel() for n, v in scores.items()}, 400)
    chosen = per_tensor_topk(scores, 400)
    for name, value in scores.items():
        assert torch.equal(chosen[name], _concatenated_topk({name: value}, quotas[name])[name]), name


def test_api_errors_say_what_is_wrong():
    from sparsepeft import DenseMaskEngine, SparseDeltaEngine
    from sparsepeft.selection import Budget
    from sparsepeft.selection.budget import BudgetError
    from sparsepeft.selection.fish_tuning import FishTuningConfig

    model = make_model("bert")
    scores = _scores(model)
    name = next(iter(scores))
    with pytest.raises(TypeError, match="keep_ratio must be a number.*'0.5'"):
        select_mask(scores, "0.5")
    wrong = dict(scores, **{name: torch.rand(3, 3)})
    with pytest.raises(ValueError, match=rf"shape differs: \['{name}: scores \(3, 3\)"):
        select_mask(wrong, 0.05, model=model)
    with pytest.raises(BudgetError, match=r"r='x' must be a whole number"):
        FishTuningConfig(budget="lora:r=x")
    assert Budget.parse("lora:r=8").reference_options == {"r": 8}
    mask = select_mask(scores, 0.05, model=model)
    engine = SparseDeltaEngine(model, mask).attach()
    for second in (SparseDeltaEngine, DenseMaskEngine):
        with pytest.raises(RuntimeError, match="A SparseDeltaEngine is already attached"):
            second(model, mask)
    engine.detach()
    DenseMaskEngine(model, mask).attach().detach()  # detached: a new engine is welcome


@pytest.mark.parametrize("strategy", ["global", "per_tensor"])
@pytest.mark.parametrize("lowest", [False, True])
def test_a_mask_measured_group_by_group_is_the_one_pass_mask(strategy, lowest):
    from sparsepeft.selection.grouped import group_parameters, grouped_fisher_mask

    model = make_model("bert")
    examples = make_examples(12)
    fisher = estimate_fisher(model, examples, num_samples=12, batch_size=4, progress=False)
    if lowest:
        fisher = {n: f.neg() for n, f in fisher.items()}
    reference = select_mask(fisher, 0.03, strategy=strategy, model=model)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    groups = group_parameters(sizes, capacity_bytes=4 * max(sizes.values()))  # as small as the largest tensor
    assert len(groups) > 3 and [n for g in groups for n in g] == list(sizes)
    grouped = grouped_fisher_mask(model, examples, groups, 0.03, strategy=strategy, lowest=lowest,
                                  num_samples=12, batch_size=4, progress=False)
    assert grouped.indices.keys() == reference.indices.keys()
    assert all(torch.equal(grouped.indices[n], reference.indices[n]) for n in reference.indices)
    assert grouped.config["fisher_groups"] == len(groups)


def test_the_allocation_adds_up_to_the_mask_and_is_saved_with_it(tmp_path):
    import json

    from safetensors import safe_open

    model = make_model("bert")
    mask = select_mask(_scores(model), 0.05, model=model)
    report = mask.allocation(top=3)
    for key in ("per_module_type", "per_block"):
        assert sum(v["kept"] for v in report[key].values()) == mask.num_selected
        assert abs(sum(v["share"] for v in report[key].values()) - 1) < 1e-9
    kept = sorted((mask.kept(n) for n in mask.shapes), reverse=True)
    assert [t["kept"] for t in report["top_tensors"]] == kept[:3]
    assert report["tensors_with_entries"] == sum(1 for n in mask.shapes if mask.kept(n))
    assert "entries in" in mask.allocation_line() and report["top_tensors"][0]["name"] in mask.allocation_line()
    mask.save(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        header = json.loads(handle.metadata()["sparsepeft_mask"])
    assert header["allocation"] == json.loads(json.dumps(mask.allocation()))


@pytest.mark.parametrize("strategy", ["global", "per_tensor"])
def test_a_mask_measured_in_row_ranges_is_the_one_pass_mask(strategy):
    from sparsepeft.selection.grouped import grouped_fisher_mask

    model = make_model("llama-lm")
    examples = make_examples(10, lm=True)
    fisher = estimate_fisher(model, examples, num_samples=10, batch_size=5, progress=False)
    reference = select_mask(fisher, 0.03, strategy=strategy, model=model)
    groups = []
    for name, param in model.named_parameters():  # every matrix in three row ranges, each its own pass
        if param.dim() == 2 and param.shape[0] >= 3:
            cut = [0, param.shape[0] // 3, 2 * param.shape[0] // 3, param.shape[0]]
            groups += [[(name, (a, b))] for a, b in zip(cut, cut[1:])]
        else:
            groups.append([name])
    grouped = grouped_fisher_mask(model, examples, groups, 0.03, strategy=strategy, num_samples=10, batch_size=5,
                                  progress=False)
    assert grouped.indices.keys() == reference.indices.keys()
    assert all(torch.equal(grouped.indices[n], reference.indices[n]) for n in reference.indices)


def test_a_group_of_many_tensors_holds_at_most_its_budget_of_candidates(monkeypatch):
    """Each group's candidates are its own best k entries per part, not k per tensor: at 374M one group of 36
    tensors had kept up to k entries from each of them (about 0.8 GB), and the mask phase peaked above training."""
    from sparsepeft.selection import grouped

    model = make_model("bert")
    examples = make_examples(8)
    names = [n for n, _ in model.named_parameters()]
    held = []
    original = grouped._prune

    def counting_prune(values, positions, *args):
        held.append(sum(v.numel() for v in values.values()))
        return original(values, positions, *args)

    monkeypatch.setattr(grouped, "_prune", counting_prune)
    mask = grouped.grouped_fisher_mask(model, examples, [names[: len(names) // 2], names[len(names) // 2:]], 0.2,
                                       always_train=(), num_samples=8, batch_size=4, progress=False)
    fisher = estimate_fisher(model, examples, num_samples=8, batch_size=4, progress=False)
    reference = select_mask(fisher, 0.2, model=model, always_train=())
    assert all(torch.equal(mask.indices[n], reference.indices[n]) for n in reference.indices)
    budget = mask.num_selected
    assert len(held) == 2 and max(held) <= 2 * budget, (held, budget)


def test_row_allocation_counts_each_rows_kept_entries_as_a_loop_does():
    from sparsepeft.selection.mask import SparseMask

    torch.manual_seed(0)
    shape = (12, 5)
    chosen = torch.rand(shape) < 0.3
    chosen[4] = True  # one whole row
    mask = SparseMask({"emb.weight": shape, "bias": (5,)}, {"emb.weight": chosen.flatten().nonzero().flatten()})
    report = mask.row_allocation("emb.weight", top=3)
    per_row = [int(chosen[r].sum()) for r in range(shape[0])]  # the slow reference
    assert report["kept"] == sum(per_row) and report["rows"] == 12 and report["row_width"] == 5
    assert report["rows_with_entries"] == sum(1 for n in per_row if n) and report["full_rows"] == per_row.count(5)
    expected = sorted(range(12), key=lambda r: (-per_row[r], r))[:3]
    assert [(row["row"], row["kept"]) for row in report["top_rows"]] == [(r, per_row[r]) for r in expected]
    assert report["top_rows"][0] == {"row": 4, "kept": 5}
    with pytest.raises(ValueError, match="matrix"):
        mask.row_allocation("bias")
