"""Layer-wise tuning (IST, LISA, random, full): discovery, suppression, score update, Trainer, resume, errors."""

import json
import math

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import make_examples, make_model, no_dropout
from sparsepeft import (LayerSelectionError, LayerwiseCallback, LayerwiseConfig, LayerwiseEngine, apply_method,
                        ist_score_update)
from sparsepeft.data.collate import PaddingCollator
from sparsepeft.importance.suppression import suppress, suppressible_modules
from sparsepeft.selection.layers import LayerSampler
from sparsepeft.models import BlockDiscoveryError, block_parameters, find_blocks

LAYERS = 4
METHOD_OPTIONS = {
    "lora": {"r": 2, "target_modules": None},
    "dora": {"r": 2, "target_modules": None},
    "adapter": {"bottleneck_size": 4},
    "parallel": {"bottleneck_size": 4},
}
TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "gpt2": ["c_attn"],
           "llama": ["q_proj", "v_proj"], "llama-lm": ["q_proj", "v_proj"]}


def _peft_model(family="bert", method="lora", seed=0, layers=LAYERS):
    model = make_model(family, layers=layers, seed=seed)
    options = dict(METHOD_OPTIONS[method])
    if "target_modules" in options:
        options["target_modules"] = TARGETS[family]
    model = apply_method(model, method, options)
    torch.manual_seed(seed + 100)
    with torch.no_grad():  # a trained-looking adapter: suppression has something to scale
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _args(out, **overrides):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
                max_grad_norm=1.0, max_steps=12, report_to="none", disable_tqdm=True, use_cpu=True,
                logging_steps=1, save_strategy="no", seed=3, data_seed=3, dataloader_pin_memory=False)
    base.update(overrides)
    return TrainingArguments(**base)


# --------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama", "llama-lm"])
@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "parallel"])
def test_blocks_and_their_peft_parameters_are_found(family, method):
    model = _peft_model(family, method)
    groups = block_parameters(model)
    assert groups.block_ids == list(range(LAYERS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(groups.names()) == trainable
    for index in groups.block_ids:
        assert all(f".{index}." in name for name, _ in groups.blocks[index])
    assert all(not name.split(".")[-1].startswith("lora") for name, _ in groups.outside)
    path, blocks = find_blocks(model)
    assert all(suppressible_modules(block) for block in blocks)


def test_a_model_without_a_block_list_says_how_to_name_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(BlockDiscoveryError, match="blocks_path"):
        block_parameters(model)
    with pytest.raises(BlockDiscoveryError, match="not a non-empty nn.ModuleList"):
        block_parameters(make_model("bert"), blocks_path="bert.pooler")


def test_layers_outside_the_peft_method_are_not_candidates():
    model = apply_method(make_model("bert", layers=LAYERS), "lora",
                         {"r": 2, "target_modules": ["query"], "layers_to_transform": [1, 3]})
    assert block_parameters(model).block_ids == [1, 3]


# --------------------------------------------------------------------------- suppression


@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "parallel"])
def test_suppression_scales_exactly_what_the_method_adds(method):
    model = no_dropout(_peft_model("bert", method)).double().eval()
    _, blocks = find_blocks(model)
    for module in suppressible_modules(blocks[1]):
        x = torch.randn(3, 5, module.down.in_features if hasattr(module, "down") else module.in_features,
                        dtype=torch.float64)
        full = module(x)
        base = torch.zeros_like(full) if hasattr(module, "down") else module.get_base_layer()(x)
        with suppress([module], 0.25):
            suppressed = module(x)
        torch.testing.assert_close(suppressed, base + 0.25 * (full - base), rtol=1e-12, atol=1e-12)
        assert torch.equal(module(x), full), "suppression was not undone"


def test_suppressing_a_block_changes_only_that_block():
    model = no_dropout(_peft_model("bert", "lora")).eval()
    batch = PaddingCollator(0)(make_examples(4))
    _, blocks = find_blocks(model)
    with torch.no_grad():
        plain = model(**batch).logits
        with suppress(suppressible_modules(blocks[2]), 0.25):
            suppressed = model(**batch).logits
        with suppress(suppressible_modules(blocks[2]), 1.0):
            unit = model(**batch).logits
    assert not torch.allclose(plain, suppressed)
    assert torch.equal(plain, unit)


# --------------------------------------------------------------------------- configuration and score rule


def test_ist_score_update_matches_the_formula_by_hand():
    scores = torch.tensor([0.0, 0.5, -1.0, 2.0], dtype=torch.float64)
    subsets, losses = [[0, 1], [1, 3], [2, 3]], [0.7, 0.9, 0.4]
    rewards = [math.exp(-x) for x in losses]
    mean = sum(rewards) / 3
    p = [1 / (1 + math.exp(-s)) for s in scores.tolist()]
    expected = scores.tolist()
    for k, subset in enumerate(subsets):
        for l in subset:
            expected[l] += 10 * (rewards[k] - mean) * p[l] * (1 - p[l])
    updated = ist_score_update(scores, subsets, losses, 10.0)
    assert updated.tolist() == pytest.approx(expected, abs=1e-15)
    assert updated[0] - scores[0] == pytest.approx(10 * (rewards[0] - mean) * 0.25)  # p(1-p) = 1/4 at s = 0


def _frequencies(draws, num_blocks):
    counts = torch.zeros(num_blocks)
    for drawn in draws:
        counts[list(drawn)] += 1
    return counts / len(draws)


def test_ist_trains_low_score_blocks_and_probes_high_score_ones():
    """High score = cheap to suppress: training draws ∝ σ(−s), probe subsets ∝ σ(s) (METHODS.md §4)."""
    sampler = LayerSampler(LayerwiseConfig("ist", seed=4), num_blocks=8)
    sampler.scores = torch.tensor([1.5] * 4 + [-1.5] * 4, dtype=torch.float64)  # blocks 0-3 cheap to suppress
    trained = _frequencies([sampler.select(step) for step in range(400)], 8)
    probed = []
    for _ in range(150):  # equal losses: zero advantage, the scores stay put
        sampler.probe(lambda subset: probed.append(subset) or 1.0)
    suppressed = _frequencies(probed, 8)
    assert sampler.scores.tolist() == [1.5] * 4 + [-1.5] * 4
    # 2 of 8 trained a step: a low-score block is drawn ~4.5x as often as a high-score one
    assert trained[4:].min() > 2.5 * trained[:4].max()
    # 4 of 8 suppressed per probe: the high-score blocks dominate
    assert suppressed[:4].min() > 1.5 * suppressed[4:].max()
    assert all(len(set(map(tuple, probed[i:i + 3]))) == 3 for i in range(0, len(probed), 3))  # distinct per update


def test_lisa_redraws_every_interval_and_random_every_step():
    lisa = LayerSampler(LayerwiseConfig("lisa", interval=5, seed=1), num_blocks=8)
    draws = [tuple(lisa.select(step)) for step in range(40)]
    assert all(len(drawn) == 2 for drawn in draws)
    periods = [draws[start:start + 5] for start in range(0, 40, 5)]
    assert all(len(set(period)) == 1 for period in periods)  # held for K steps
    assert len({period[0] for period in periods}) > 1  # and re-drawn at multiples of K
    uniform = LayerSampler(LayerwiseConfig("random", seed=1), num_blocks=8)
    draws = [tuple(uniform.select(step)) for step in range(40)]
    assert sum(a != b for a, b in zip(draws, draws[1:])) > 20 and all(len(d) == 2 for d in draws)


def test_counts_and_bad_fractions():
    assert LayerwiseConfig("ist").count(32) == 8
    assert LayerwiseConfig("random", fraction=0.5).count(6) == 3
    assert LayerwiseConfig("lisa").count(12) == 2
    assert LayerwiseConfig("full").count(5) == 5
    with pytest.raises(LayerSelectionError, match="selects no block of 3"):
        LayerwiseConfig("ist").count(3)
    with pytest.raises(LayerSelectionError, match=r"\(0, 1\]"):
        LayerwiseConfig("ist", fraction=1.5)
    with pytest.raises(LayerSelectionError, match="model has 4"):
        LayerwiseConfig("lisa", num_layers=5).count(4)
    with pytest.raises(LayerSelectionError, match="Unknown layer strategy"):
        LayerwiseConfig("top")
    with pytest.raises(LayerSelectionError, match="optimizer_state"):
        LayerwiseConfig(optimizer_state="disk")


def test_probe_batch_larger_than_the_data_and_too_few_distinct_probes_are_refused():
    model = _peft_model()
    with pytest.raises(LayerSelectionError, match="probe_batch_size=16 is larger than the 10"):
        LayerwiseEngine(model, LayerwiseConfig("ist", fraction=0.5), make_examples(10), PaddingCollator(0)).attach()
    with pytest.raises(LayerSelectionError, match="lower num_probes"):
        LayerwiseEngine(_peft_model(layers=2), LayerwiseConfig("ist", fraction=0.5), make_examples(32),
                        PaddingCollator(0)).attach()
    with pytest.raises(LayerSelectionError, match="hold no PEFT module"):
        LayerwiseEngine(make_model("bert", layers=LAYERS), LayerwiseConfig("ist", fraction=0.5), make_examples(32),
                        PaddingCollator(0)).attach()


# --------------------------------------------------------------------------- plain loop


def _loop(model, config, steps=8, data=None, optimizer_kwargs=None, hooks=None, set_to_none=True):
    data = data or make_examples(64, seed=5)
    collate = PaddingCollator(0)
    engine = LayerwiseEngine(model, config, data, collate).attach()
    optimizer = torch.optim.AdamW(engine.trainable_parameters(), lr=1e-2, **(optimizer_kwargs or {}))
    log = []
    for step in range(steps):
        selected = engine.step_begin(optimizer)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(**collate(data[(4 * step) % 60:(4 * step) % 60 + 4])).loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)
        moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
        log.append((selected, grads, moved, dict(optimizer.state)))
    return engine, optimizer, log


def _blocks_of(names, path):
    prefix = f"{path}."
    return {int(n[len(prefix):].split(".")[0]) for n in names if n.startswith(prefix)}


@pytest.mark.parametrize("strategy", ["ist", "lisa", "random", "full"])
def test_only_selected_blocks_get_gradients_and_move(strategy):
    model = _peft_model()
    config = LayerwiseConfig(strategy, fraction=0.5 if strategy in ("ist", "random") else None, interval=3,
                             probe_interval=2)
    engine, _, log = _loop(model, config, optimizer_kwargs={"weight_decay": 0.1})
    path = engine.groups.path
    for selected, grads, moved, _ in log:
        assert _blocks_of(grads, path) == set(selected) == _blocks_of(moved, path)
        assert any("classifier" in n for n in grads)  # the task head trains with every strategy
    counts = [len(s) for s, *_ in log]
    assert counts == [{"ist": 2, "random": 2, "lisa": 2, "full": 4}[strategy]] * len(log)
    if strategy == "lisa":
        draws = [s for s, *_ in log]
        assert draws[0] == draws[1] == draws[2] and draws[3] == draws[4] == draws[5]
    if strategy == "ist":
        assert [p["step"] for p in engine.probes] == [2, 4, 6]
    engine.detach()
    assert all(p.requires_grad for p in engine.trainable_parameters())


def test_blocks_sitting_out_do_not_move_when_the_loop_zeroes_gradients_instead_of_freeing_them():
    """zero_grad(set_to_none=False) leaves zero tensors behind; AdamW would still step a block that holds
    one (momentum, weight decay), so a block that sits a step out must hold no gradient at all."""
    model = _peft_model()
    engine, _, log = _loop(model, LayerwiseConfig("random", fraction=0.5), optimizer_kwargs={"weight_decay": 0.1},
                           set_to_none=False)
    path = engine.groups.path
    for selected, grads, moved, _ in log:
        assert _blocks_of(grads, path) == set(selected) == _blocks_of(moved, path)


def test_backward_stops_below_the_lowest_selected_block():
    model = _peft_model("llama-lm", "lora")
    _, blocks = find_blocks(model)
    records = []
    handles = [block.register_forward_hook(lambda m, i, o, k=k: records.append((k, _first(o).requires_grad)))
               for k, block in enumerate(blocks)]
    data = make_examples(64, lm=True)
    engine, _, log = _loop(model, LayerwiseConfig("random", num_layers=1), steps=6, data=data)
    for handle in handles:
        handle.remove()
    for step, (selected, *_) in enumerate(log):
        graph = dict(records[LAYERS * step:LAYERS * (step + 1)])
        assert graph == {k: k >= selected[0] for k in range(LAYERS)}


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("policy", ["keep", "offload", "drop"])
def test_optimizer_state_policy(policy):
    model = _peft_model()
    engine, optimizer, log = _loop(model, LayerwiseConfig("random", num_layers=1, optimizer_state=policy), steps=8)
    params = {id(p): i for i in engine.block_ids for _, p in engine.groups.blocks[i]}
    for selected, _, _, state in log:
        blocks_with_state = {params[id(p)] for p in state if id(p) in params}
        if policy == "drop":
            assert blocks_with_state == set(selected)  # unselected blocks' moments were dropped
        else:
            assert blocks_with_state >= set(selected)
    seen = set().union(*(set(s) for s, *_ in log))
    if policy != "drop":
        assert {params[id(p)] for p in optimizer.state if id(p) in params} == seen
    engine.detach(optimizer)


# --------------------------------------------------------------------------- Trainer


class _Recorder(TrainerCallback):
    """Sees each step's selection, gradients and weight changes. It reads the selection after the backward,
    so it holds wherever the LayerwiseCallback sits in the list (Trainer's callback-state restore moves it last)."""

    def __init__(self, layerwise):
        self.layerwise = layerwise
        self.steps = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._selected = list(self.layerwise.engine.selections[-1])
        self._grads = {n for n, p in model.named_parameters() if p.grad is not None}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), self._before[n])}
        self.steps.append((self._selected, self._grads, moved, self.layerwise.engine.scores))


def _train(model, config, out, examples, probe_data=None, **overrides):
    layerwise = LayerwiseCallback(config, probe_data=probe_data, collate_fn=PaddingCollator(0) if probe_data else None)
    recorder = _Recorder(layerwise)
    trainer = Trainer(model=model, args=_args(out, **overrides), train_dataset=examples,
                      data_collator=PaddingCollator(0), callbacks=[layerwise, recorder])
    return trainer, layerwise, recorder


@pytest.mark.parametrize("family,strategy", [("bert", "ist"), ("llama-lm", "ist"), ("roberta", "lisa"),
                                             ("gpt2", "random")])
def test_trainer_updates_only_the_selected_blocks(tmp_path, family, strategy):
    model = _peft_model(family, "lora")
    examples = make_examples(48, lm=family.endswith("-lm"), seed=7)
    config = LayerwiseConfig(strategy, fraction=0.5 if strategy != "lisa" else None, interval=4, probe_interval=5)
    trainer, layerwise, recorder = _train(model, config, tmp_path, examples)
    trainer.train()
    path = find_blocks(model)[0]
    assert len(recorder.steps) == 12
    for selected, grads, moved, _ in recorder.steps:
        assert _blocks_of(grads, path) == set(selected) == _blocks_of(moved, path)
    history = json.loads((tmp_path / "layerwise_history.json").read_text())
    assert history["selections"] == [s for s, *_ in recorder.steps]
    assert (tmp_path / "layerwise_heatmap.png").stat().st_size > 1000
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [e["layers_selected"] for e in logged] == [" ".join(map(str, s)) for s, *_ in recorder.steps]
    if strategy == "ist":
        assert [p["step"] for p in history["probes"]] == [5, 10]
        top = logged[-1]["layer_scores_top"].split()  # three blocks, not one key per block
        assert len(top) == 3 and not any(key.startswith("layer_score_") and key[-1].isdigit() for key in logged[-1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # detached: every block trainable again
    assert _blocks_of(trainable, path) == set(range(LAYERS))


class _HandCheck(TrainerCallback):
    """Listed before LayerwiseCallback: at the first probe step, recomputes IST's update by hand."""

    def __init__(self, layerwise, examples, probe_step):
        self.layerwise = layerwise
        self.examples = examples
        self.probe_step = probe_step
        self.expected = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.probe_step:
            return
        engine = self.layerwise.engine
        config = engine.config
        generator = torch.Generator()
        generator.set_state(engine.sampler.generator.get_state())
        scores = engine.sampler.scores.tolist()
        indices = torch.randperm(len(self.examples), generator=generator)[:config.probe_batch_size].tolist()
        batch = PaddingCollator(0)([self.examples[i] for i in indices])
        weights = torch.tensor([1 / (1 + math.exp(-s)) for s in scores])
        subsets = []
        while len(subsets) < config.num_probes:
            subset = sorted(torch.multinomial(weights, len(scores) // 2, replacement=False, generator=generator).tolist())
            if subset not in subsets:
                subsets.append(subset)
        _, blocks = find_blocks(model)
        model.eval()
        losses = []
        for subset in subsets:  # suppression by hand: LoRA's scaling of the chosen blocks times 0.25
            layers = [m for i in subset for m in blocks[i].modules() if hasattr(m, "lora_A")]
            for layer in layers:
                layer.scaling["default"] *= 0.25
            with torch.no_grad():
                losses.append(float(model(**batch).loss))
            for layer in layers:
                layer.scaling["default"] /= 0.25
        model.train()
        rewards = [math.exp(-x) for x in losses]
        mean = sum(rewards) / len(rewards)
        p = [1 / (1 + math.exp(-s)) for s in scores]
        expected = list(scores)
        for subset, reward in zip(subsets, rewards):
            for l in subset:
                expected[l] += 10 * (reward - mean) * p[l] * (1 - p[l])
        self.expected = (subsets, expected)


def test_trainer_score_update_matches_a_hand_computed_update(tmp_path):
    model = _peft_model("bert", "lora", seed=2)
    examples = make_examples(40, seed=9)
    layerwise = LayerwiseCallback(LayerwiseConfig("ist", fraction=0.5, seed=11, probe_chunk_size=16))
    check = _HandCheck(layerwise, examples, probe_step=10)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=examples, data_collator=PaddingCollator(0),
                      callbacks=[check, layerwise])
    trainer.train()
    subsets, expected = check.expected
    probe = layerwise.history["probes"][0]
    assert probe["step"] == 10 and probe["subsets"] == subsets
    assert probe["scores"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert any(abs(s) > 0 for s in probe["scores"])


@pytest.mark.parametrize("restore_flag", [False, True])
def test_resume_continues_with_identical_scores_and_selections(tmp_path, restore_flag):
    """The same with Trainer's restore_callback_states_from_checkpoint on or off: on, Trainer rebuilds the
    callback from its saved args, which must not drop the user's probe data or the user's handle."""
    examples = make_examples(48, seed=7)
    probes = make_examples(20, seed=11)  # not the training data: scores would differ if it were dropped
    config = LayerwiseConfig("ist", fraction=0.5, probe_interval=3, seed=5)
    same = dict(save_strategy="steps", save_steps=6, lr_scheduler_type="constant",  # a 6-step run = first half
                restore_callback_states_from_checkpoint=restore_flag)
    full, _, straight = _train(_peft_model(seed=1), config, tmp_path / "a", examples, probes, **same)
    full.train()
    first, _, _ = _train(_peft_model(seed=1), config, tmp_path / "b", examples, probes, max_steps=6, **same)
    first.train()
    resumed, layerwise, after = _train(_peft_model(seed=1), config, tmp_path / "b", examples, probes, **same)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    assert [cb for cb in resumed.callback_handler.callbacks if isinstance(cb, LayerwiseCallback)] == [layerwise]
    assert layerwise.probe_data is probes
    assert [s for s, *_ in after.steps] == [s for s, *_ in straight.steps[6:]]
    assert after.steps[-1][3] == straight.steps[-1][3]  # identical scores, bit for bit
    assert layerwise.history["selections"] == [s for s, *_ in straight.steps]
    assert any(abs(v) > 0 for v in after.steps[-1][3].values())


def test_resume_from_a_checkpoint_of_another_model_is_refused(tmp_path):
    examples = make_examples(48, seed=7)
    config = LayerwiseConfig("random", fraction=0.5)
    first, _, _ = _train(_peft_model(), config, tmp_path, examples, save_strategy="steps", save_steps=4, max_steps=4)
    first.train()
    engine = LayerwiseEngine(_peft_model(layers=6), config).attach()
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    state = saved["stateful_callbacks"]["LayerwiseCallback"]["attributes"]["_resume_state"]
    with pytest.raises(LayerSelectionError, match="another model"):
        engine.load_state_dict(state)
    engine = LayerwiseEngine(_peft_model(), LayerwiseConfig("lisa")).attach()
    with pytest.raises(LayerSelectionError, match="same strategy"):
        engine.load_state_dict(state)


def test_an_optimizer_without_some_blocks_is_refused(tmp_path):
    model = _peft_model()
    frozen = [p for n, p in model.named_parameters() if ".layer.3." in n and p.requires_grad]
    for param in frozen:  # the LISA-port bug: a block frozen when Trainer builds its optimizer
        param.requires_grad_(False)
    layerwise = LayerwiseCallback(LayerwiseConfig("lisa"))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=make_examples(16),
                      data_collator=PaddingCollator(0), callbacks=[layerwise])
    trainer.create_optimizer()  # built while block 3 was frozen
    for param in frozen:
        param.requires_grad_(True)
    with pytest.raises(LayerSelectionError, match=r"blocks \[3\]"):
        trainer.train()


def test_the_probe_restores_each_module_mode():
    model = _peft_model()
    model.train()
    model.base_model.model.eval()  # a PEFT wrapper in train mode around a model in eval mode (from_pretrained)
    modes = {name: m.training for name, m in model.named_modules()}
    engine = LayerwiseEngine(model, LayerwiseConfig("ist", fraction=0.5, probe_interval=1), make_examples(32),
                             PaddingCollator(0)).attach()
    engine.step_begin(step=1)
    assert engine.probes and {name: m.training for name, m in model.named_modules()} == modes


@pytest.mark.parametrize("family", ["llama-lm", "bert"])
def test_the_probe_in_chunks_gives_the_loss_of_one_pass(family):
    """Chunks of the training batch size, weighted by label-token count, equal the one-pass loss (float64);
    the causal-LM examples have different lengths, so an unweighted mean of chunk losses would differ."""
    from sparsepeft.importance.suppression import suppressed_loss

    model = _peft_model(family).double()
    examples = make_examples(10, lm=family.endswith("-lm"), seed=5)
    batch = PaddingCollator(0)(examples)
    modules = [m for block in find_blocks(model)[1][:2] for m in suppressible_modules(block)]
    whole = suppressed_loss(model, batch, modules, 0.25)
    chunked = suppressed_loss(model, batch, modules, 0.25, chunk_size=3)
    # LLaMA's RMSNorm computes in float32 even in a float64 model, which bounds the agreement there
    assert chunked == pytest.approx(whole, rel=1e-7 if family.startswith("llama") else 1e-12)
    chunks = [PaddingCollator(0)(examples[i:i + 3]) for i in range(0, 10, 3)]
    plain_mean = sum(suppressed_loss(model, c, modules, 0.25) for c in chunks) / len(chunks)
    if family.endswith("-lm"):
        assert plain_mean != pytest.approx(whole, rel=1e-4)  # the weighting is what makes them equal


def test_the_callback_probes_in_chunks_of_the_training_batch(tmp_path):
    config = LayerwiseConfig("ist", fraction=0.5, probe_interval=2, probe_batch_size=8)
    trainer, layerwise, _ = _train(_peft_model(), config, tmp_path, make_examples(32, seed=7), max_steps=3)
    seen = []
    original = LayerwiseEngine.attach

    def spy(engine):
        seen.append(engine.config.probe_chunk_size)
        return original(engine)

    LayerwiseEngine.attach = spy
    try:
        trainer.train()
    finally:
        LayerwiseEngine.attach = original
    assert seen == [4] and layerwise.config.probe_chunk_size is None  # the user's config is left as given


def test_a_plain_loop_ist_engine_chunks_its_probe_by_the_training_batch():
    model = make_model("bert")
    given = LayerwiseEngine(model, LayerwiseConfig("ist", probe_chunk_size=3), train_batch_size=8)
    assert given.config.probe_chunk_size == 3  # the config's own value wins
    assert LayerwiseEngine(model, LayerwiseConfig("ist"), train_batch_size=4).config.probe_chunk_size == 4
    assert LayerwiseEngine(model, LayerwiseConfig("ist")).config.probe_chunk_size == 8  # DEFAULT_PROBE_CHUNK
    assert LayerwiseEngine(model, LayerwiseConfig("lisa")).config.probe_chunk_size is None  # no probes
