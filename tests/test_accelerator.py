"""On an accelerator: engines that follow ``model.to(device)``, the Fisher and the selection on the device.

These need a CUDA device and are skipped without one; benchmarks/gpu_check.sh runs them on a GPU. The CPU
versions of the same properties are in test_sparse_delta_engine.py, test_fisher.py and test_selection.py.
"""

import os

import pytest
import torch

from conftest import make_examples, make_model, random_score_mask
from sparsepeft import DenseMaskEngine, SparseDeltaEngine, estimate_fisher
from sparsepeft.data.collate import PaddingCollator
from sparsepeft.selection.topk import global_topk

DEVICE = os.environ.get("SPARSEPEFT_TEST_DEVICE", "cuda")  # "cpu" checks the tests themselves on a CPU
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device here: benchmarks/gpu_check.sh runs these on a GPU")


def _train(model, engine, steps=4):
    optimizer = torch.optim.AdamW(engine.trainable_parameters(), lr=5e-3, weight_decay=0.1)
    engine.attach_optimizer(optimizer)
    examples = make_examples(16, seed=3)
    collate = PaddingCollator(0)
    model.train()
    for step in range(steps):
        batch = {k: v.to(DEVICE) for k, v in collate(examples[4 * (step % 4): 4 * (step % 4) + 4]).items()}
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("engine_cls,ratio", [(SparseDeltaEngine, 0.02), (DenseMaskEngine, 0.02),
                                              (DenseMaskEngine, 0.5)])  # 0.5: the boolean-mask form
def test_an_engine_attached_on_the_cpu_trains_on_the_device_as_one_attached_there(engine_cls, ratio):
    mask = random_score_mask(make_model("bert"), ratio=ratio)
    reference = make_model("bert").to(DEVICE)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    _train(reference, engine_cls(reference, mask).attach())
    moved = make_model("bert")
    engine = engine_cls(moved, mask).attach()
    moved.to(DEVICE)
    _train(moved, engine)
    for (name, a), (_, b) in zip(reference.named_parameters(), moved.named_parameters()):
        assert a.device.type == DEVICE and torch.equal(a, b), name
        if name not in before:  # the sparse engine's value vectors, registered while it is attached
            continue
        keep = mask.dense(name, device=DEVICE) if name in mask.shapes else torch.zeros_like(a, dtype=torch.bool)
        assert torch.equal(a[~keep], before[name][~keep]), f"{name}: a frozen entry moved"


def test_the_fisher_and_its_mask_on_the_device_match_the_cpu():
    model = make_model("bert")
    examples = make_examples(12)
    on_cpu = estimate_fisher(model, examples, num_samples=12, batch_size=4, progress=False)
    on_device = estimate_fisher(model.to(DEVICE), examples, num_samples=12, batch_size=4, progress=False)
    for name, value in on_cpu.items():
        assert on_device[name].device.type == DEVICE
        torch.testing.assert_close(on_device[name].cpu(), value, rtol=1e-4, atol=1e-10)


def test_selection_on_the_device_keeps_the_cpu_entries():
    g = torch.Generator().manual_seed(0)
    scores = {f"t{i}": torch.rand(n, generator=g) for i, n in enumerate((3_000_000, 17, 1_500_001))}
    scores["t1"][:] = 0.5  # ties across tensors
    k = 40_000
    on_device = global_topk({n: v.to(DEVICE) for n, v in scores.items()}, k)
    on_cpu = global_topk(scores, k)
    assert all(torch.equal(on_device[n], on_cpu[n]) for n in scores)
