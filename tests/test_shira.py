"""Fisher-chosen SHiRA masks: the entries, PEFT's save/load/merge round trip, the CLI, and bad input."""

import json

import pytest
import torch
from peft import PeftModel, ShiraConfig, get_peft_model
from safetensors.torch import load_file

from conftest import make_examples, make_model
from sparsepeft import estimate_fisher
from sparsepeft.cli.main import main
from sparsepeft.selection.shira import shira_fisher, shira_mask_fn

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _top_entries(scores: torch.Tensor, k: int) -> set[int]:
    """The k largest by a full stable sort (ties to the lower position): the slow reference."""
    flat = scores.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    return set(order[:k])


def _fisher_shira(model, data, r=2):
    config = ShiraConfig(r=r, target_modules=TARGETS)
    config.mask_fn = shira_mask_fn(model, data, target_modules=TARGETS, num_samples=len(data), batch_size=4,
                                   progress=False)
    return get_peft_model(model, config)


def test_each_layer_keeps_its_top_r_m_plus_n_fisher_entries():
    torch.manual_seed(0)
    model = make_model("llama-lm")
    data = make_examples(12, lm=True)
    whole = estimate_fisher(model, data, num_samples=len(data), batch_size=4, progress=False)
    targeted = shira_fisher(model, data, TARGETS, num_samples=len(data), batch_size=4, progress=False)
    assert sorted(targeted) == sorted(n for n in whole if n.rsplit(".", 2)[-2] in TARGETS)
    for name, value in targeted.items():  # only the targeted weights are scored, with the same values
        torch.testing.assert_close(value, whole[name], rtol=1e-5, atol=0)
    peft_model = _fisher_shira(model, data, r=2)
    layers = {n: m for n, m in peft_model.named_modules() if getattr(m, "shira_indices", None)}
    assert len(layers) == 3 * 2  # three targets in each of the two blocks
    for module_name, layer in layers.items():
        name = module_name.replace("base_model.model.", "", 1) + ".weight"
        rows, cols = whole[name].shape
        indices = layer.shira_indices["default"].long()
        assert indices.shape == (2, 2 * (rows + cols))
        chosen = set((indices[0] * cols + indices[1]).tolist())
        assert chosen == _top_entries(whole[name], 2 * (rows + cols)), module_name


def test_a_fisher_shira_adapter_saves_loads_and_merges_like_any_peft_adapter(tmp_path):
    torch.manual_seed(0)
    data = make_examples(12, lm=True)
    peft_model = _fisher_shira(make_model("llama-lm"), data)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = {"input_ids": torch.tensor([d["input_ids"][:3] for d in data])}
    for _ in range(3):
        peft_model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(**batch).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            untouched = peft_model(**batch).logits
    assert not torch.allclose(trained, untouched)  # the adapter does something
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "SHIRA"
    torch.manual_seed(1)  # the loader's own random mask must not matter: the saved indices replace it
    loaded = PeftModel.from_pretrained(make_model("llama-lm"), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, trained)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-5, atol=1e-6)
    del base


def test_bad_input_is_a_clear_error():
    model, data = make_model("llama-lm"), make_examples(6, lm=True)
    fn = shira_mask_fn(model, data, target_modules=TARGETS, num_samples=6, progress=False)
    config = ShiraConfig(r=50, target_modules=TARGETS)  # 50 * (16 + 16) > 16 * 16
    config.mask_fn = fn
    with pytest.raises(ValueError, match=r"r=50 asks for r\*\(m\+n\).*lower r to at most"):
        get_peft_model(model, config)
    with pytest.raises(ValueError, match="nn.Linear layers only.*Conv1D"):
        shira_mask_fn(make_model("gpt2-lm"), make_examples(4, lm=True), target_modules=["c_attn"], num_samples=4)
    other = make_model("llama-lm")
    with pytest.raises(ValueError, match="not measured on this model"):
        shira_mask_fn(other, fisher={"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    foreign = shira_mask_fn(other, data, target_modules=TARGETS, num_samples=6, progress=False)
    config = ShiraConfig(r=2, target_modules=TARGETS)
    config.mask_fn = foreign  # built for another model object: its layers are not this one's
    with pytest.raises(ValueError, match="No Fisher for the"):
        get_peft_model(make_model("llama-lm"), config)
    with pytest.raises(ValueError, match="either data"):
        shira_mask_fn(model)


def _write_pairs(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))


def _train(model_dir, out, tmp_path, *flags):
    words = "good bad great film movie dog cat price".split()
    rows = [(f"the {words[i % 8]} is", words[(i * 3) % 8]) for i in range(48)]
    _write_pairs(tmp_path / "train.jsonl", rows)
    _write_pairs(tmp_path / "dev.jsonl", rows[:8])
    return main(["train", "--model", str(model_dir), "--task-type", "causal-lm", "--train-file",
                 str(tmp_path / "train.jsonl"), "--validation-file", str(tmp_path / "dev.jsonl"),
                 "--max-seq-length", "32", "--per-device-train-batch-size", "8", "--learning-rate", "1e-2",
                 "--report-to", "none", "--save-strategy", "no", "--disable-tqdm", "true", "--use-cpu", "true",
                 "--max-steps", "4", "--seed", "0", "--output-dir", str(out), "--method", "shira", "--shira-r", "2",
                 "--target-modules", "q_proj,v_proj", "--num-samples", "32", *flags])


@pytest.mark.parametrize("selection", ["fisher", "random"])
def test_cli_trains_a_shira_adapter_that_peft_loads(tiny_llama_lm_dir, tmp_path, selection):
    out = tmp_path / "run"
    assert _train(tiny_llama_lm_dir, out, tmp_path, "--selection", selection) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "shira" and results["selection"] == selection
    # 4 blocks x (q: 16x16, v: 8x16) at r = 2: 2 * (32 + 24) * 4
    assert results["trainable_params"] == 4 * 2 * ((16 + 16) + (8 + 16))
    allocation = results["mask_allocation"]  # where SHiRA's entries are, like any other mask's
    assert allocation["num_selected"] == results["trainable_params"] and allocation["tensors_with_entries"] == 8
    assert set(allocation["per_module_type"]) == {"self_attn.q_proj", "self_attn.v_proj"}
    assert allocation["per_module_type"]["self_attn.q_proj"]["kept"] == 4 * 2 * (16 + 16)
    assert (results.get("fisher_seconds") is not None) == (selection == "fisher")
    weights = load_file(str(out / "adapter_model.safetensors"))
    values = [v for k, v in weights.items() if k.endswith("shira_weight")]
    assert len(values) == 8 and all(v.abs().sum() > 0 for v in values)  # every layer's entries were trained
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_lm_dir), out)
    indices = {k: v for k, v in weights.items() if k.endswith("shira_indices")}
    for name, module in loaded.named_modules():
        key = next((k for k in indices if k.startswith(name + ".")), None) if getattr(module, "shira_indices", None) else None
        if key is not None:
            assert torch.equal(module.shira_indices["default"].long(), indices[key].long())


def test_cli_shira_refuses_fish_and_other_selections(tiny_llama_lm_dir, tmp_path, capsys):
    assert _train(tiny_llama_lm_dir, tmp_path / "a", tmp_path, "--fish") == 2
    assert "drop --fish" in capsys.readouterr().err
    assert _train(tiny_llama_lm_dir, tmp_path / "b", tmp_path, "--selection", "ird") == 2
    assert "--selection fisher" in capsys.readouterr().err
    assert not (tmp_path / "a" / "results.json").exists() and not (tmp_path / "b" / "results.json").exists()


# --------------------------------------------------------------------------- a sparse delta as a SHiRA adapter


def _delta(tmp_path, names, ratio=0.1, always_train=()):
    import copy

    from sparsepeft import select_mask
    from sparsepeft.engines.delta import save_delta
    from sparsepeft.selection.mask import model_fingerprint

    base = make_model("llama-lm")
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(p.shape, generator=g) for n, p in base.named_parameters() if n.endswith(names)}
    mask = select_mask(scores, ratio, model=base, always_train=always_train)
    trained = copy.deepcopy(base)
    params = dict(trained.named_parameters())
    with torch.no_grad():
        for name, index in mask.indices.items():
            params[name].view(-1)[index] += torch.randn(index.numel(), generator=g)
    path = tmp_path / "sparse_delta.safetensors"
    save_delta(trained, mask, path, fingerprint=model_fingerprint(base))
    return base, trained, mask, path


def test_a_delta_on_linear_weights_exports_as_a_shira_adapter_with_the_same_model(tmp_path):
    import copy

    from sparsepeft.integrations.shira import export_delta_as_shira

    base, trained, mask, path = _delta(tmp_path, ("q_proj.weight", "down_proj.weight", "k_proj.weight"))
    counts = {n: int(i.numel()) for n, i in mask.indices.items()}
    assert len(set(counts.values())) > 1  # a global budget: the layers hold different counts
    fresh = copy.deepcopy(base)
    report = export_delta_as_shira(base, path, tmp_path / "shira")
    assert report["trained_entries"] == mask.num_selected and report["layers"] == 6
    sizes = {"q_proj": 16 + 16, "k_proj": 8 + 16, "down_proj": 16 + 32}
    need = max(-(-c // sizes[n.rsplit(".", 2)[-2]]) for n, c in counts.items())
    assert report["r"] == need  # the smallest r whose r(m+n) holds every layer's entries
    assert report["adapter_entries"] == sum(need * sizes[n.rsplit(".", 2)[-2]] for n in counts)
    assert torch.equal(dict(base.named_parameters())["model.layers.0.self_attn.q_proj.weight"],
                       dict(fresh.named_parameters())["model.layers.0.self_attn.q_proj.weight"])  # left as it was
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "shira").eval()
    trained.eval()
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        merged = loaded.merge_and_unload()
    for name, index in mask.indices.items():  # the merged weights are the delta's, entry by entry
        torch.testing.assert_close(dict(merged.named_parameters())[name], dict(trained.named_parameters())[name],
                                   rtol=0, atol=1e-6)


def test_what_shira_cannot_hold_is_refused_by_name_and_nothing_is_written(tmp_path):
    from sparsepeft.integrations.shira import ShiraExportError, export_delta_as_shira

    base, _, _, path = _delta(tmp_path, ("q_proj.weight", "embed_tokens.weight", "input_layernorm.weight"))
    with pytest.raises(ShiraExportError, match=r"nn.Linear weights only.*embed_tokens.weight.*input_layernorm"):
        export_delta_as_shira(base, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # q_proj (16 x 16) holds ~240 entries: r = 8, and 8 * (8 + 16) = 192 entries do not fit in k_proj (8 x 16)
    base, _, _, path = _delta(tmp_path, ("q_proj.weight", "k_proj.weight"), ratio=0.9)
    with pytest.raises(ShiraExportError, match="too small.*k_proj"):
        export_delta_as_shira(base, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="other parameter names or shapes"):
        export_delta_as_shira(make_model("bert"), path, tmp_path / "out")


def test_cli_exports_a_fitting_delta_and_refuses_a_whole_model_fish_delta(tiny_llama_lm_dir, tmp_path, capsys):
    import copy

    from transformers import AutoModelForCausalLM

    from sparsepeft import select_mask
    from sparsepeft.engines.delta import save_delta

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_lm_dir)
    scores = {n: torch.rand(p.shape) for n, p in base.named_parameters() if n.endswith("v_proj.weight")}
    mask = select_mask(scores, 0.2, model=base, always_train=())
    trained = copy.deepcopy(base)
    with torch.no_grad():
        for name, index in mask.indices.items():
            dict(trained.named_parameters())[name].view(-1)[index] += 0.5
    save_delta(trained, mask, tmp_path / "fits.safetensors")
    assert main(["export-shira", "--model", str(tiny_llama_lm_dir), "--delta", str(tmp_path / "fits.safetensors"),
                 "--output-dir", str(tmp_path / "adapter")]) == 0
    assert "SHiRA adapter (r=" in capsys.readouterr().out
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_lm_dir), tmp_path / "adapter")
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    # a FISH Mask over the whole model (embeddings and norms included) is not a SHiRA adapter
    out = tmp_path / "fish"
    _write_pairs(tmp_path / "pairs.jsonl", [("the good film is", "great")] * 16)
    assert main(["train", "--model", str(tiny_llama_lm_dir), "--task-type", "causal-lm", "--train-file",
                 str(tmp_path / "pairs.jsonl"), "--validation-file", str(tmp_path / "pairs.jsonl"), "--max-steps", "2",
                 "--per-device-train-batch-size", "8", "--report-to", "none", "--save-strategy", "no",
                 "--disable-tqdm", "true", "--use-cpu", "true", "--output-dir", str(out), "--method", "fish",
                 "--keep-ratio", "0.05", "--num-samples", "16"]) == 0
    capsys.readouterr()
    assert main(["export-shira", "--model", str(tiny_llama_lm_dir), "--delta", str(out / "sparse_delta.safetensors"),
                 "--output-dir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "nn.Linear weights only" in err and "embed_tokens.weight" in err
    assert not (tmp_path / "refused").exists()


def test_cli_shira_budget_larger_than_a_layer_is_a_clear_error(tiny_llama_lm_dir, tmp_path, capsys):
    out = tmp_path / "big"
    assert _train(tiny_llama_lm_dir, out, tmp_path, "--shira-r", "50") == 2  # 50 * (16 + 16) > 16 * 16
    assert "lower r to at most" in capsys.readouterr().err
    assert not (out / "results.json").exists() and not (out / "adapter_model.safetensors").exists()
