"""Two gloo processes on the CPU: distributed Fisher and DDP training against one process."""

import sys

import pytest
import torch
import torch.multiprocessing as mp

from conftest import make_examples, make_model, random_score_mask
from distributed_workers import ddp_worker, fisher_worker, length_grouped_worker, no_dropout, train
from sparsepeft import estimate_fisher
from sparsepeft.data.collate import PaddingCollator

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _spawn(fn, *args):
    mp.spawn(fn, args=(2, *args), nprocs=2, join=True)


def test_distributed_fisher_equals_the_single_process_fisher(tmp_path):
    out = tmp_path / "fisher.pt"
    _spawn(fisher_worker, str(tmp_path / "init"), str(out))
    distributed = torch.load(out)
    single = estimate_fisher(make_model("bert").double(), make_examples(30), num_samples=23, batch_size=4,
                             progress=False)
    assert set(distributed) == set(single)
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-12, atol=1e-15)
    # each rank scored only its own shard: disjoint halves whose union is exactly the one-process draw
    examples = make_examples(30)
    draw = torch.randperm(30, generator=torch.Generator().manual_seed(0))[:23].tolist()
    shards = [torch.load(f"{out}.samples.rank{r}") for r in range(2)]
    assert sorted(len(s) for s in shards) == [11, 12]
    as_set = [{tuple(ids) for ids in s} for s in shards]
    assert not (as_set[0] & as_set[1])
    assert as_set[0] | as_set[1] == {tuple(examples[i]["input_ids"]) for i in draw}


@pytest.mark.parametrize("engine", ["dense-mask", "sparse"])
def test_ddp_training_matches_one_process_with_the_global_batch_and_keeps_frozen_entries(tmp_path, engine):
    out = tmp_path / "weights"
    _spawn(ddp_worker, str(tmp_path / "init"), str(out), engine)
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    before = {n: p.detach().clone() for n, p in no_dropout(make_model("bert")).named_parameters()}
    model = no_dropout(make_model("bert"))
    mask = random_score_mask(model, 0.1)
    examples = make_examples(16, lengths=(8, 9))
    order = [examples[i] for i in range(0, 16, 2)], [examples[i] for i in range(1, 16, 2)]
    batches = [PaddingCollator(0)(order[0][i : i + 4] + order[1][i : i + 4]) for i in (0, 4)]
    train(model, mask, engine, batches, steps=4, ddp=False)
    for name, param in model.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
        keep = mask.dense(name)
        assert torch.equal(ranks[0][name][~keep], before[name][~keep]), f"frozen entries of {name} moved"
        torch.testing.assert_close(ranks[0][name], param.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shuffle", [False, True], ids=["trainers-order", "shuffled"])
def test_length_grouped_epochs_cover_every_example_once_across_processes(tmp_path, shuffle):
    """Trainer's LengthGroupedSampler draws from each process's global generator, which training moves differently
    per process: from the second epoch on the two processes trained 9-17 examples of 64 twice (and as many not at
    all). SparseTrainer seeds the order with --seed and the epoch on every process."""
    import os

    mp.spawn(length_grouped_worker, args=(2, 29600 + os.getpid() % 300 + 300 * shuffle, str(tmp_path), shuffle),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"seen.rank{r}") for r in range(2)]
    examples = {tuple(e["input_ids"]) for e in make_examples(64, lengths=(3, 30), seed=2)}
    assert len(examples) == 64 and sorted(ranks[0]) == sorted(ranks[1]) == [0, 1, 2]
    for epoch in range(3):
        trained = ranks[0][epoch] + ranks[1][epoch]
        assert len(trained) == 64 and set(trained) == examples, f"epoch {epoch}: examples repeated or left out"
    assert ranks[0][0] != ranks[0][1]  # a new order every epoch


@pytest.mark.parametrize("flags", [["--method", "fish", "--engine", "sparse", "--keep-ratio", "0.05"],
                                   ["--method", "lora", "--lora-r", "4", "--fish", "--budget", "50%",
                                    "--fisher-warmup-steps", "2"]], ids=["fish-sparse", "lora-fish"])
def test_cli_under_torchrun_with_two_processes(tiny_bert_dir, tmp_path, flags):
    import json
    import os
    import subprocess

    from sparsepeft import SparseMask

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), "-m", "sparsepeft", "train", "--model", str(tiny_bert_dir),
               "--task", "demo", "--max-train-samples", "48", "--max-eval-samples", "16", "--num-samples", "32",
               "--max-seq-length", "32", "--per-device-train-batch-size", "4", "--num-train-epochs", "1",
               "--learning-rate", "1e-2", "--report-to", "none", "--save-strategy", "no", "--disable-tqdm", "true",
               "--use-cpu", "true", "--output-dir", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["trainable_params"] == SparseMask.load(out / "sparse_mask.safetensors").num_selected


@pytest.mark.parametrize("what", ["mask", "weights"])
def test_ranks_that_disagree_fail_loudly(tmp_path, what):
    from distributed_workers import mismatch_worker

    with pytest.raises(Exception, match="RankMismatchError|ranks disagree"):
        _spawn(mismatch_worker, str(tmp_path / "init"), what)


def test_fsdp_and_deepspeed_are_refused_with_a_clear_error():
    from types import SimpleNamespace

    from sparsepeft import DenseMaskEngine, SparseDeltaEngine
    from sparsepeft.utils.distributed import ShardedTrainingNotSupported, refuse_sharded_args

    for args in (SimpleNamespace(fsdp=["full_shard"], deepspeed=None), SimpleNamespace(fsdp=[], deepspeed="ds.json")):
        with pytest.raises(ShardedTrainingNotSupported, match="plain DDP"):
            refuse_sharded_args(args)
    refuse_sharded_args(SimpleNamespace(fsdp=[], deepspeed=None))
    model = make_model("bert")
    model.bert.encoder.layer[0]._fsdp_wrapped_module = model.bert.encoder.layer[0].attention  # as FSDP1 wraps
    for engine in (DenseMaskEngine, SparseDeltaEngine):
        with pytest.raises(ShardedTrainingNotSupported, match="FSDP"):
            engine(model, random_score_mask(model, 0.1)).attach()
    model = make_model("bert")
    next(model.parameters()).ds_id = 0  # DeepSpeed ZeRO-3 marks its partitioned parameters
    with pytest.raises(ShardedTrainingNotSupported, match="ZeRO-3"):
        DenseMaskEngine(model, random_score_mask(model, 0.1)).attach()


def test_layerwise_ist_under_ddp_matches_one_process_and_ranks_choose_alike(tmp_path):
    from distributed_workers import layerwise_model, layerwise_train, layerwise_worker

    out = tmp_path / "layerwise"
    _spawn(layerwise_worker, str(tmp_path / "init"), str(out))
    ranks = [torch.load(f"{out}.rank{r}") for r in range(2)]
    examples = make_examples(16, lengths=(8, 9))
    order = [examples[i] for i in range(0, 16, 2)], [examples[i] for i in range(1, 16, 2)]
    batches = [PaddingCollator(0)(order[0][i : i + 4] + order[1][i : i + 4]) for i in (0, 4)]
    single = layerwise_train(layerwise_model(), batches, examples, steps=6, ddp=False)
    assert ranks[0]["selections"] == ranks[1]["selections"] == single["selections"]
    assert ranks[0]["graded"] == ranks[0]["selections"]  # blocks that sat out kept .grad None under DDP
    assert ranks[0]["scores"] == ranks[1]["scores"]
    torch.testing.assert_close(torch.tensor(ranks[0]["scores"]), torch.tensor(single["scores"]), rtol=1e-4, atol=1e-7)
    for name, value in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), f"ranks disagree on {name}"
        torch.testing.assert_close(ranks[0]["weights"][name], value, rtol=1e-4, atol=1e-5)
