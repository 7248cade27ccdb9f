import pytest
import torch
from torch import nn

from conftest import make_examples, make_model
from reference import loop_fisher, relative_error
from sparsepeft import estimate_fisher
from sparsepeft.importance import PerSampleGradCapture, find_rule

FAMILIES = [("bert", "classification"), ("roberta", "classification"), ("gpt2", "classification"),
            ("llama", "classification"), ("gpt2-lm", "lm"), ("llama-lm", "lm")]


def _run(model, examples, **kwargs):
    """The batched Fisher, checked to come from the per-layer rules alone: every parameter is covered by a rule
    and nothing falls back to the exact per-sample loop (which would agree with the reference just as well)."""
    import warnings

    capture = PerSampleGradCapture(model, {n: p for n, p in model.named_parameters() if p.requires_grad})
    assert capture.uncovered == [], f"no rule for {capture.uncovered}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # num_samples == len(data): every sample is used, in a seeded order; the reference is order-free
        fisher = estimate_fisher(model, examples, num_samples=len(examples), batch_size=5, progress=False, **kwargs)
    fallbacks = [str(w.message) for w in caught if "exact but slow" in str(w.message)]
    assert not fallbacks, fallbacks
    return fisher


@pytest.mark.parametrize("family,task", FAMILIES)
def test_batched_fisher_matches_batch_size_one_loop_float32(family, task):
    model = make_model(family)
    examples = make_examples(13, lm=task == "lm")
    fast = _run(model, examples)
    slow = loop_fisher(model, examples, task)
    assert set(fast) == set(slow)
    assert relative_error(fast, slow) < 1e-4


@pytest.mark.parametrize("family,task", FAMILIES)
def test_batched_fisher_is_exact_in_float64(family, task):
    model = make_model(family).double()
    examples = make_examples(9, lm=task == "lm")
    # LLaMA's RMSNorm computes in float32 even in a float64 model, which bounds its agreement
    tolerance = 1e-6 if family.startswith("llama") else 1e-10
    assert relative_error(_run(model, examples), loop_fisher(model, examples, task)) < tolerance


@pytest.mark.parametrize("mode", ["expected", "absolute"])
def test_other_modes_match_their_loop(mode):
    model = make_model("bert", num_labels=3).double()
    examples = make_examples(8, num_labels=3)
    assert relative_error(_run(model, examples, mode=mode), loop_fisher(model, examples, mode=mode)) < 1e-10


def test_regression_head():
    model = make_model("bert", num_labels=1).double()
    examples = make_examples(8, regression=True)
    assert relative_error(_run(model, examples), loop_fisher(model, examples, "regression")) < 1e-10


def test_regression_expected_mode_is_gradient_of_prediction_squared():
    model = make_model("bert", num_labels=1).double()
    examples = make_examples(6, regression=True)
    fast = _run(model, examples, mode="expected")
    model.eval()
    slow = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for ex in examples:
        pred = model(input_ids=torch.tensor([ex["input_ids"]])).logits.reshape(())
        for (n, p), g in zip(model.named_parameters(), torch.autograd.grad(pred, list(model.parameters()))):
            slow[n] += g**2 / len(examples)
    assert relative_error(fast, slow) < 1e-10


class ScaledHead(nn.Module):
    """A layer no rule covers: an elementwise scale parameter applied functionally."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, inner.config.num_labels))

    @property
    def config(self):
        return self.inner.config

    def forward(self, **inputs):
        out = self.inner(**inputs)
        out.logits = out.logits * self.scale
        return out


def test_uncovered_parameters_use_exact_fallback():
    model = ScaledHead(make_model("bert")).double()
    examples = make_examples(7)
    capture = PerSampleGradCapture(model, dict(model.named_parameters()))
    assert capture.uncovered == ["scale"]
    with pytest.warns(UserWarning, match="exact but slow"):
        fast = estimate_fisher(model, examples, num_samples=7, batch_size=3, progress=False, task_type="classification")
    assert relative_error(fast, loop_fisher(model, examples)) < 1e-10


def test_state_is_restored_and_dropout_is_off():
    model = make_model("bert")
    model.train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    examples = make_examples(6)
    first = _run(model, examples, params=lambda n, p: "classifier" in n or "layer.1" in n)
    assert model.training
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "word_embeddings" not in n)
    assert set(first) == {n for n, _ in model.named_parameters() if "classifier" in n or "layer.1" in n}
    assert torch.equal(first["classifier.weight"], _run(model, examples, params=["classifier.weight"])["classifier.weight"])


def test_num_samples_larger_than_data_warns_and_uses_all():
    model = make_model("bert")
    examples = make_examples(5)
    with pytest.warns(UserWarning, match="larger than the data"):
        fisher = estimate_fisher(model, examples, num_samples=100, batch_size=4, progress=False)
    assert relative_error(fisher, loop_fisher(model, examples)) < 1e-4


def test_nan_gradients_name_the_parameter():
    model = make_model("bert")
    examples = make_examples(4)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="sample"):
        _run(model, examples)


def test_no_trainable_parameter_is_a_clear_error():
    model = make_model("bert")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="No parameter to score"):
        _run(model, make_examples(3))


def test_rule_lookup_respects_overridden_forward():
    class Reimplemented(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class Renamed(nn.Linear):
        pass

    assert find_rule(nn.Linear(2, 2)) is not None
    assert find_rule(Renamed(2, 2)) is find_rule(nn.Linear(2, 2))
    assert find_rule(Reimplemented(2, 2)) is None


def test_non_finite_gradient_with_finite_loss_names_the_parameter():
    model = make_model("bert")

    def loss_fn(logits, batch):  # finite loss, but d sqrt(|x|)/dx at x = 0 is not finite
        return (logits[:, 0] * 0).abs().sqrt()

    with pytest.raises(FloatingPointError, match=r"per-sample gradients of \['bert"):
        estimate_fisher(model, make_examples(4), num_samples=4, batch_size=2, progress=False, loss_fn=loss_fn)


class SometimesShared(nn.Module):
    """A layer whose input is shared by the whole batch only in some batches: rules cannot split it then."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.bias_table = nn.Linear(1, inner.config.num_labels)
        self.calls = 0

    @property
    def config(self):
        return self.inner.config

    def forward(self, **inputs):
        out = self.inner(**inputs)
        self.calls += 1
        batch = out.logits.shape[0]
        feature = torch.ones(1 if self.calls % 2 == 0 else batch, 1, dtype=out.logits.dtype)
        out.logits = out.logits + self.bias_table(feature)
        return out


def test_parameters_moved_to_the_fallback_midway_are_not_counted_twice():
    model = SometimesShared(make_model("bert")).double()
    examples = make_examples(8)
    with pytest.warns(UserWarning, match="exact but slow"):
        fast = estimate_fisher(model, examples, num_samples=8, batch_size=2, progress=False, task_type="classification")
    assert relative_error(fast, loop_fisher(model, examples)) < 1e-10


class Reshuffling:
    """Re-iterable, but every pass draws other samples (a shuffling loader over more data than is scored)."""

    def __init__(self, examples, collate, batch_size: int):
        self.examples, self.collate, self.batch_size = examples, collate, batch_size
        self.generator = torch.Generator().manual_seed(0)
        self.passes: list[list[int]] = []

    def __iter__(self):
        order = torch.randperm(len(self.examples), generator=self.generator).tolist()
        self.passes.append(order)
        for i in range(0, len(order), self.batch_size):
            yield self.collate([self.examples[j] for j in order[i:i + self.batch_size]])


@pytest.mark.parametrize("source", ["generator", "reshuffling"])
def test_exact_fallback_scores_the_same_samples_from_a_one_shot_iterable(source):
    """A generator is spent after the batched pass, and a shuffling loader draws other samples: the fallback
    must still score exactly the samples the fast rules scored (it used to return 0, or other samples)."""
    from sparsepeft.data.collate import collator_for

    model = ScaledHead(make_model("bert")).double()
    examples = make_examples(12)
    collate = collator_for(model)
    if source == "generator":
        data, scored = (collate(examples[i:i + 3]) for i in range(0, 7, 3)), examples[:7]
    else:
        data = Reshuffling(examples, collate, 3)
    with pytest.warns(UserWarning, match="exact but slow"):
        fast = estimate_fisher(model, data, num_samples=7, progress=False, task_type="classification")
    if source == "reshuffling":
        scored = [examples[j] for j in data.passes[0][:7]]
    assert float(fast["scale"].abs().sum()) > 0
    assert relative_error(fast, loop_fisher(model, scored)) < 1e-10


_TIED_FISHER_PEAK = r"""
import resource, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
from sparsepeft import estimate_fisher

torch.manual_seed(0)
vocab, width, batch = 50000, 128, 16
model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=width, n_layer=1, n_head=2, n_positions=16,
                                   bos_token_id=1, eos_token_id=2))
assert model.lm_head.weight is model.transformer.wte.weight
examples = [{"input_ids": torch.randint(3, vocab, (8,)).tolist()} for _ in range(batch)]
for example in examples:
    example["labels"] = list(example["input_ids"])
estimate_fisher(model, examples[:2], num_samples=2, batch_size=2, progress=False)  # allocator warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fisher = estimate_fisher(model, examples, num_samples=batch, batch_size=batch, progress=False)
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(f"{grown_mb:.0f}")
"""


def test_tied_embeddings_are_scored_without_a_batch_by_vocab_buffer():
    """Tied input/output embeddings get each sample's two contributions summed before squaring. Doing that
    for the whole batch at once takes batch x vocab x hidden floats (410 MB here, 2.5 GB for GPT-2 small at
    batch 16); one sample at a time takes one table (26 MB). Peak RSS growth is measured in a fresh process."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _TIED_FISHER_PEAK], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mb = float(done.stdout.strip().splitlines()[-1])
    assert grown_mb < 250, f"the Fisher pass grew the peak by {grown_mb:.0f} MB; a batch-sized buffer is 410 MB"


@pytest.mark.parametrize("family", ["bert", "llama-lm"])
def test_fisher_under_bf16_autocast_is_float32_and_close_to_the_float32_fisher(family):
    from conftest import make_examples, make_model

    model = make_model(family)
    examples = make_examples(16, lm=family.endswith("-lm"))
    reference = estimate_fisher(model, examples, num_samples=16, progress=False)
    low = estimate_fisher(model, examples, num_samples=16, progress=False, autocast_dtype=torch.bfloat16)
    assert all(value.dtype == torch.float32 for value in low.values())
    error = sum(float((reference[n] - low[n]).abs().sum()) for n in reference)
    scale = sum(float(reference[n].abs().sum()) for n in reference)
    assert 0 < error / scale < 0.05  # bf16 did run (not bit-equal), and the sums stayed float32-accurate
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())  # the model as it was


def test_an_outer_autocast_context_gives_the_same_fisher_as_the_argument():
    model = make_model("llama-lm")
    examples = make_examples(8, lm=True)
    given = estimate_fisher(model, examples, num_samples=8, progress=False, autocast_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outer = estimate_fisher(model, examples, num_samples=8, progress=False)
    assert all(torch.equal(given[n], outer[n]) for n in given)


def test_per_sample_blocks_in_row_chunks_give_the_same_fisher_and_sample_mass(monkeypatch):
    from sparsepeft.importance import fisher as fisher_module
    from sparsepeft.importance.fisher import estimate_fisher_and_sample_mass

    model = make_model("llama-lm")
    examples = make_examples(8, lm=True)
    whole, whole_mass = estimate_fisher_and_sample_mass(model, examples, range(8), batch_size=4, progress=False)
    monkeypatch.setattr(fisher_module, "BLOCK_ENTRIES", 7)  # every weight in blocks of a row or a few
    chunked, chunked_mass = estimate_fisher_and_sample_mass(model, examples, range(8), batch_size=4, progress=False)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-5, atol=0)
    torch.testing.assert_close(chunked_mass, whole_mass, rtol=1e-6, atol=0)
    assert relative_error(chunked, loop_fisher(model, examples, "lm")) < 1e-4


@pytest.mark.parametrize("family", ["bert", "llama-lm", "gpt2-lm"])
def test_scoring_row_ranges_gives_the_rows_of_the_whole_fisher(family):
    model = make_model(family)
    examples = make_examples(8, lm=family.endswith("-lm"))
    whole = estimate_fisher(model, examples, num_samples=8, batch_size=4, progress=False)
    rows = {n: (1, max(2, f.shape[0] - 1)) for n, f in whole.items() if f.dim() >= 1 and f.shape[0] > 2}
    parts = estimate_fisher(model, examples, num_samples=8, batch_size=4, progress=False, rows=rows)
    for name, value in whole.items():
        expected = value[rows[name][0] : rows[name][1]] if name in rows else value
        torch.testing.assert_close(parts[name], expected, rtol=1e-5, atol=1e-12)


def test_the_fisher_logs_two_lines_instead_of_a_bar_when_stderr_is_not_a_terminal(caplog, capsys):
    model = make_model("bert")
    with caplog.at_level("INFO", logger="sparsepeft"):
        estimate_fisher(model, make_examples(8), num_samples=8, batch_size=2, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("fisher")]
    assert lines[0] == "Fisher: 8 samples in batches of 2 ..." and lines[1].startswith("Fisher: 8 samples in ")
    assert "Fisher:" not in capsys.readouterr().err  # no tqdm bar in a log


def test_the_drawn_samples_are_batched_longest_first_and_the_fisher_is_unchanged():
    """A random batch pads every sample to its longest: the suite's Fisher pass (timedial's long prompts among
    short ones) padded nearly every batch of 8 to 256 tokens. The same samples are drawn (seeded), then batched
    in order of length; the Fisher is still the per-sample loop's."""
    from sparsepeft.data.collate import collator_for

    model = make_model("llama-lm")
    examples = make_examples(40, lengths=(2, 30), lm=True)
    collate = collator_for(model)
    batches = []

    def recording(features):
        batches.append([len(f["input_ids"]) for f in features])
        return collate(features)

    fisher = estimate_fisher(model, examples, num_samples=24, batch_size=5, progress=False, collate_fn=recording)
    lengths = [n for batch in batches for n in batch]
    assert lengths == sorted(lengths, reverse=True)
    drawn = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))[:24].tolist()
    assert sorted(lengths) == sorted(len(examples[i]["input_ids"]) for i in drawn)
    padded = sum(max(batch) * len(batch) for batch in batches)
    in_draw_order = [[len(examples[i]["input_ids"]) for i in drawn[k:k + 5]] for k in range(0, 24, 5)]
    assert padded < sum(max(batch) * len(batch) for batch in in_draw_order)
    assert relative_error(fisher, loop_fisher(model, [examples[i] for i in drawn], "lm")) < 1e-4
