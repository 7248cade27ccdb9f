"""Bottleneck adapters: injection into encoder and decoder families, exact placement, save/load."""

import copy

import pytest
import torch

from conftest import make_examples, make_model
from sparsepeft.adapters import (
    BottleneckConfig,
    add_bottleneck_adapters,
    load_bottleneck_adapters,
    remove_bottleneck_adapters,
    save_bottleneck_adapters,
)
from sparsepeft.data.collate import PaddingCollator
from sparsepeft.models import BlockDiscoveryError, find_blocks

FAMILIES = ["bert", "roberta", "llama", "gpt2"]
KINDS = ["series", "pfeiffer", "parallel"]


def _batch(n=4):
    return PaddingCollator(0)(make_examples(n))


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _randomise_adapters(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bottleneck_adapters" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_adapters_start_as_identity_and_only_they_and_the_head_train(family, kind):
    model = make_model(family)
    batch = _batch()
    base = _logits(model, batch)
    add_bottleneck_adapters(model, BottleneckConfig(kind=kind, bottleneck_size=4))
    assert torch.equal(_logits(model, batch), base)  # up projection starts at zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("bottleneck_adapters" in n or n.startswith(("classifier", "score")) for n in trainable)
    per_block = 2 if kind == "series" else 1
    assert sum("down.weight" in n for n in trainable) == per_block * len(find_blocks(model)[1])
    _randomise_adapters(model)
    assert not torch.allclose(_logits(model, batch), base)


def test_series_and_parallel_adapters_sit_where_the_papers_put_them():
    model = make_model("llama")
    block = find_blocks(model)[1][0]
    x = torch.randn(2, 5, 16)
    plain_mlp = block.mlp(x)
    add_bottleneck_adapters(model, BottleneckConfig(kind="parallel", bottleneck_size=4))
    _randomise_adapters(model)
    adapter = block.bottleneck_adapters["ffn"]
    torch.testing.assert_close(block.mlp(x), plain_mlp + adapter(x))  # reads the FFN input, adds to its output
    remove_bottleneck_adapters(model)
    assert torch.equal(block.mlp(x), plain_mlp) and not hasattr(block, "bottleneck_adapters")

    add_bottleneck_adapters(model, BottleneckConfig(kind="series", bottleneck_size=4))
    _randomise_adapters(model)
    h = block.mlp.down_proj(block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x))  # hooks add the adapter
    plain = torch.nn.functional.linear(block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x),
                                       block.mlp.down_proj.weight)
    torch.testing.assert_close(h, plain + block.bottleneck_adapters["ffn"](plain))  # reads the FFN output


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, family):
    model = make_model(family)
    add_bottleneck_adapters(model, BottleneckConfig(kind="parallel", bottleneck_size=3, locations=["attention", "ffn"]))
    _randomise_adapters(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("classifier", "score")):
                p.mul_(2)  # the head is saved with the adapters: the reloaded model must get these values
    save_bottleneck_adapters(model, tmp_path)
    fresh = make_model(family)  # same seed: same base weights, the original head
    load_bottleneck_adapters(fresh, tmp_path)
    batch = _batch()
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


def test_loading_adapters_into_another_model_is_refused(tmp_path):
    model = make_model("bert")
    add_bottleneck_adapters(model, BottleneckConfig(bottleneck_size=3))
    save_bottleneck_adapters(model, tmp_path)
    other = make_model("llama")
    with pytest.raises(ValueError, match="do not fit this model"):
        load_bottleneck_adapters(other, tmp_path)
    assert not hasattr(other, "_bottleneck_config")


def test_deepcopy_keeps_each_copy_wired_to_its_own_adapters():
    model = add_bottleneck_adapters(make_model("bert"), BottleneckConfig(bottleneck_size=3))
    twin = copy.deepcopy(model)
    _randomise_adapters(twin)
    batch = _batch()
    assert not torch.equal(_logits(model, batch), _logits(twin, batch))


def test_unknown_block_layout_and_bad_config_are_clear_errors():
    with pytest.raises(ValueError, match="kind"):
        BottleneckConfig(kind="sideways")
    with pytest.raises(ValueError, match="locations"):
        BottleneckConfig(locations=["embeddings"])
    model = make_model("bert")
    with pytest.raises(BlockDiscoveryError, match="candidates here: .'bert.encoder.layer'"):
        find_blocks(model, "bert.encoder")
    with pytest.raises(ValueError, match="module_names"):
        add_bottleneck_adapters(model, BottleneckConfig(module_names={"ffn_output": "no.such.module"}))
