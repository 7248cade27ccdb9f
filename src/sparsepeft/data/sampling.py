"""Length-grouped batches in random order: Trainer's ``group_by_length`` padding saving without its curriculum.

Trainer's ``LengthGroupedSampler`` shuffles the examples, cuts them into mega-batches of 50 batches, and sorts
each mega-batch longest first. Within a mega-batch the batches therefore run from long to short, and when the
training set is a union of tasks whose prompts differ in length, length is nearly the task: on the commonsense
suite (docs/selection.md) every mega-batch trains timedial, then epistemic_reasoning, then winowhy, then
social_iqa, one block after another, and the last ~10 steps of every mega-batch (the run's last steps included)
see social_iqa alone. Within a two-answer task the answer with the shorter prompts comes last in its block.

:func:`shuffled_length_groups` keeps Trainer's grouping (the same batches, so the same padding) and trains the
batches in random order. The first batch, which holds the longest example, stays first so a batch too large for
memory still fails at once; an incomplete last batch stays last. The same fix is proposed upstream elsewhere
(ms-swift's ``group_by_length_shuffle_batches``).

Under DDP (transformers 5 with accelerate) Trainer's ``LengthGroupedSampler`` draws from each process's global
generator, which accelerate does not synchronise for it. The processes agree in the first epoch, but training moves
each one's generator by a different amount (dropout draws one number per entry of its own batch), so from the
second epoch on they group differently and together train some examples twice and others not at all.
:class:`EpochSeededLengthGroupedSampler` draws from a generator seeded with ``--seed`` and the epoch instead, the same
on every process; :class:`~sparsepeft.integrations.trainer.SparseTrainer` uses it whenever it trains on more than
one process.
"""

from __future__ import annotations

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from .tasks import task_names


def shuffled_length_groups(lengths: list[int], batch_size: int, generator: torch.Generator | None = None,
                           mega_batch_mult: int | None = None) -> list[int]:
    """Trainer's length-grouped order, its batches of ``batch_size`` permuted (the first and a short last one kept
    in place). ``generator=None`` draws from torch's global generator, as Trainer's sampler does, so ``--seed``
    decides both the grouping and the order."""
    order = get_length_grouped_indices(lengths, batch_size, mega_batch_mult=mega_batch_mult, generator=generator)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    tail = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    head, rest = batches[:1], batches[1:]
    permutation = torch.randperm(len(rest), generator=generator).tolist()
    return [i for batch in head + [rest[p] for p in permutation] + tail for i in batch]


class ShuffledLengthGroupedSampler(LengthGroupedSampler):
    """Trainer's ``LengthGroupedSampler`` (the same lengths, batch size and generator) yielding
    :func:`shuffled_length_groups`."""

    def __iter__(self):
        return iter(shuffled_length_groups(self.lengths, self.batch_size, generator=self.generator))


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Trainer's length grouping (its batches shuffled when ``shuffle_batches``) drawn from a generator seeded with
    ``seed + epoch``: every process of a distributed run builds the same order in every epoch, whatever its global
    generator did, and a resumed run rebuilds the order it left. Trainer and accelerate call ``set_epoch``."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int, shuffle_batches: bool = False):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch, self.shuffle_batches = seed, 0, shuffle_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        group = shuffled_length_groups if self.shuffle_batches else get_length_grouped_indices
        return iter(group(self.lengths, self.batch_size, generator=generator))


def groups_by_length(training_args) -> bool:
    """Whether these ``TrainingArguments`` ask for Trainer's length grouping (``train_sampling_strategy`` in
    transformers 5; the older ``group_by_length`` flag where that is what the installed version has)."""
    strategy = getattr(training_args, "train_sampling_strategy", None)
    return strategy == "group_by_length" or bool(getattr(training_args, "group_by_length", False))


def check_shuffle_length_groups(shuffle: bool, training_args) -> None:
    """Refuse ``--shuffle-length-groups`` without length grouping: there would be no groups to shuffle."""
    if shuffle and not groups_by_length(training_args):
        raise ValueError("--shuffle-length-groups shuffles the batches of Trainer's length grouping: add "
                         "--train_sampling_strategy group_by_length, or drop --shuffle-length-groups.")


def task_curriculum_warning(task: str | None, training_args, shuffle_length_groups: bool) -> str | None:
    """The warning for a union of tasks trained in Trainer's length groups unshuffled, else None.

    Each mega-batch then trains the tasks one after another, longest prompts first, in the same order every time:
    a curriculum nobody asked for. On the commonsense suite it kept FISH as shipped from learning winowhy
    (docs/selection.md). A warning, not an error: the order is Trainer's documented behaviour, and a run that wants
    it (or repeats one that had it) may keep it."""
    tasks = task_names(task)
    if len(tasks) < 2 or shuffle_length_groups or not groups_by_length(training_args):
        return None
    return (f"--task {task} trains a union of {len(tasks)} tasks with --train_sampling_strategy group_by_length: "
            "Trainer sorts each mega-batch of 50 batches longest first, so where the tasks' prompts differ in length "
            "every mega-batch trains them one after another, in the same order each time. Add "
            "--shuffle-length-groups to keep the same batches (the same padding) in random order.")


def train_order(training_args, shuffle_length_groups: bool = False) -> str:
    """How a run's training examples were ordered, for results.json: Trainer's strategy, and whether its length groups
    were shuffled."""
    if groups_by_length(training_args):
        return "group_by_length, shuffled batches" if shuffle_length_groups else "group_by_length"
    return str(getattr(training_args, "train_sampling_strategy", "random"))
