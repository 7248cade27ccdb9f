"""Length-grouped batches in random order (--shuffle-length-groups): the same batches as Trainer's grouping, without
its longest-to-shortest order inside every mega-batch."""

import json

import numpy as np
import pytest
import torch
from transformers import TrainingArguments
from transformers.trainer_pt_utils import get_length_grouped_indices

from conftest import make_examples, make_model
from sparsepeft import SparseTrainer
from sparsepeft.cli.main import main
from sparsepeft.data.collate import PaddingCollator
from sparsepeft.data.sampling import EpochSeededLengthGroupedSampler, ShuffledLengthGroupedSampler, shuffled_length_groups

BATCH = 8


def _two_tasks(n: int = 4003, seed: int = 0) -> list[int]:
    """Lengths of a union of a short-prompt task and a long-prompt one, like the suite's social_iqa and timedial."""
    rng = np.random.default_rng(seed)
    return [int(rng.integers(20, 60)) if rng.random() < 0.5 else int(rng.integers(150, 256)) for _ in range(n)]


def _batches(order: list[int]) -> list[list[int]]:
    return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]


def _position_length_correlation(order: list[int], lengths: list[int], mega: int) -> float:
    """Spearman correlation, over full batches, between a batch's place inside its mega-batch and its mean length."""
    from scipy.stats import spearmanr

    full = [b for b in _batches(order) if len(b) == BATCH]
    places = [i % mega for i in range(len(full))]
    return spearmanr(places, [np.mean([lengths[i] for i in b]) for b in full]).statistic


def test_the_batches_are_trainers_own_in_another_order():
    lengths = _two_tasks()
    trainers = get_length_grouped_indices(lengths, BATCH, generator=torch.Generator().manual_seed(5))
    ours = shuffled_length_groups(lengths, BATCH, generator=torch.Generator().manual_seed(5))
    assert sorted(ours) == list(range(len(lengths)))  # every example once
    assert sorted(map(tuple, _batches(ours))) == sorted(map(tuple, _batches(trainers)))  # the same padding
    assert _batches(ours) != _batches(trainers)
    assert _batches(ours)[0] == _batches(trainers)[0]  # the longest example's batch first: an OOM shows at once
    assert max(lengths[i] for i in ours[:BATCH]) == max(lengths)
    assert _batches(ours)[-1] == _batches(trainers)[-1] and len(_batches(ours)[-1]) == len(lengths) % BATCH


def test_no_mega_batch_runs_from_long_to_short():
    """Trainer's order sorts each mega-batch of 50 batches longest first: on two tasks of different lengths every
    mega-batch trains one task, then the other. Shuffled, a batch's place says nothing about its length."""
    lengths = _two_tasks()
    generator = torch.Generator().manual_seed(1)
    trainers = get_length_grouped_indices(lengths, BATCH, generator=generator)
    ours = shuffled_length_groups(lengths, BATCH, generator=torch.Generator().manual_seed(1))
    assert _position_length_correlation(trainers, lengths, 50) < -0.9
    assert abs(_position_length_correlation(ours, lengths, 50)) < 0.2  # ~0.045 is one standard deviation here


def test_the_global_generator_decides_the_order_so_the_seed_does():
    lengths = _two_tasks(400)
    torch.manual_seed(3)
    first = shuffled_length_groups(lengths, BATCH)
    torch.manual_seed(3)
    assert shuffled_length_groups(lengths, BATCH) == first
    torch.manual_seed(4)
    assert shuffled_length_groups(lengths, BATCH) != first


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_distributed_order_depends_on_the_seed_and_epoch_only(shuffle):
    """What every process of a DDP run draws (tests/test_distributed.py trains with it): Trainer's grouping, or its
    shuffled batches, from a generator seeded with seed + epoch, whatever the global generator holds."""
    lengths = _two_tasks(400)
    sampler = EpochSeededLengthGroupedSampler(BATCH, lengths=lengths, seed=7, shuffle_batches=shuffle)
    torch.manual_seed(0)
    first = list(sampler)
    torch.manual_seed(1)
    assert list(sampler) == first
    group = shuffled_length_groups if shuffle else get_length_grouped_indices
    assert first == group(lengths, BATCH, generator=torch.Generator().manual_seed(7))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(len(lengths)))
    assert second == group(lengths, BATCH, generator=torch.Generator().manual_seed(8))


def _args(tmp_path, **overrides):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True,
                             save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, **overrides)


def test_the_trainer_trains_the_shuffled_groups_and_refuses_them_without_grouping(tmp_path):
    model, examples = make_model("bert"), make_examples(40, lengths=(3, 30), seed=2)
    trainer = SparseTrainer(model=model, args=_args(tmp_path, train_sampling_strategy="group_by_length"),
                            train_dataset=examples, data_collator=PaddingCollator(0), shuffle_length_groups=True)
    sampler = trainer._get_train_sampler()
    assert type(sampler) is ShuffledLengthGroupedSampler
    assert sampler.lengths == [len(e["input_ids"]) for e in examples] and sampler.batch_size == 4
    plain = SparseTrainer(model=model, args=_args(tmp_path, train_sampling_strategy="group_by_length"),
                          train_dataset=examples, data_collator=PaddingCollator(0))
    assert type(plain._get_train_sampler()) is not ShuffledLengthGroupedSampler  # off by default: Trainer's own
    with pytest.raises(ValueError, match="--train_sampling_strategy group_by_length"):
        SparseTrainer(model=model, args=_args(tmp_path), train_dataset=examples, data_collator=PaddingCollator(0),
                      shuffle_length_groups=True)


CLI = ["--num-train-epochs", "1", "--per-device-train-batch-size", "8", "--report-to", "none", "--disable-tqdm",
       "true", "--save-strategy", "no", "--use-cpu", "true", "--max-seq-length", "48", "--dataloader-pin-memory",
       "false", "--method", "lora"]


def test_the_cli_flag_trains_and_is_refused_without_length_grouping(tiny_bert_dir, tmp_path, capsys):
    refused = tmp_path / "refused"
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--output-dir", str(refused), *CLI,
                 "--shuffle-length-groups"]) == 2
    err = capsys.readouterr().err
    assert "--shuffle-length-groups" in err and "group_by_length" in err and "Traceback" not in err
    assert not refused.exists()  # found before anything is written
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_bert_dir), "--task", "demo", "--output-dir", str(out), *CLI,
                 "--train_sampling_strategy", "group_by_length", "--shuffle-length-groups"]) == 0
    assert json.loads((out / "results.json").read_text())["train_order"] == "group_by_length, shuffled batches"



def test_a_task_union_in_unshuffled_length_groups_is_warned_about_and_nothing_else_is(tmp_path):
    """The curriculum that held the suite's arms back (each mega-batch trains the tasks one after another) comes
    from Trainer's length grouping of a union; one task, shuffled groups or no grouping get no warning."""
    from sparsepeft.data.sampling import task_curriculum_warning

    grouped = _args(tmp_path, train_sampling_strategy="group_by_length")
    message = task_curriculum_warning("social_iqa,winowhy", grouped, shuffle_length_groups=False)
    assert message and "--shuffle-length-groups" in message and "2 tasks" in message
    assert task_curriculum_warning("social_iqa,winowhy", grouped, shuffle_length_groups=True) is None
    assert task_curriculum_warning("social_iqa", grouped, shuffle_length_groups=False) is None
    assert task_curriculum_warning(None, grouped, shuffle_length_groups=False) is None
    assert task_curriculum_warning("social_iqa,winowhy", _args(tmp_path), shuffle_length_groups=False) is None
