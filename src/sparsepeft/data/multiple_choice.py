"""Multiple-choice tasks in BIG-bench's JSON format, trained as prompt -> answer, scored by log-likelihood.

A BIG-bench task file is ``{"examples": [{"input": ..., "target_scores": {option: 0 or 1, ...}}, ...]}``.
Training uses the causal-LM machinery: ``prompt + " " + correct option + EOS`` with the loss on the answer
tokens only. Evaluation does no generation: the prompt runs once, its options are scored on its cached
keys and values (or, for models without a cache, every option is appended to the prompt and one forward
scores a batch of such sequences), and the prediction is the option with the highest
log-likelihood — summed over its tokens (``acc``) or divided by its length in characters (``acc_norm``),
the two accuracies lm-evaluation-harness reports. The option text is scored exactly as it was trained:
the same prompt tokens followed by the tokens of ``" " + option``.

A file without a split is split once, by a seed that does not change with the training seed, into
train / validation (for choosing learning rates) / test, so every run of a sweep sees the same parts.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .collate import AnswerLogitsCollator, PaddingCollator, cache_keyword, causal_lm_collator, keeps_logits
from .loading import DataError

MULTIPLE_CHOICE = "multiple-choice"
METRICS = ("acc", "acc_norm")
PROMPT_TEMPLATE = "Question: {input}\nAnswer:"
SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.2}  # the rest trains


@dataclass(frozen=True)
class ChoiceExample:
    """One question: the prompt the model reads, its options, and the index of the correct one."""

    prompt: str
    options: tuple[str, ...]
    answer: int
    where: str = ""  # file and example number, for error messages
    task: str = ""  # the task it comes from (a suite of several tasks reports each one's accuracy)

    def continuation(self, option: int) -> str:
        return " " + self.options[option]


@dataclass
class MultipleChoiceTask:
    name: str
    train: list[ChoiceExample]
    evaluation: dict[str, list[ChoiceExample]]
    source: str = ""
    metrics: tuple[str, ...] = METRICS
    is_regression: bool = False
    split: dict = field(default_factory=dict)  # how the file was split (seed, fractions, sizes)


def read_bigbench(path: str | Path, task: str = "") -> list[ChoiceExample]:
    """Every example of a BIG-bench multiple-choice file, checked: options non-empty, exactly one correct. The
    file's ``task_prefix`` (an instruction BIG-bench puts before every input) starts every prompt."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Multiple-choice file {path} does not exist.")
    try:
        payload = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not valid JSON: {error}.") from None
    rows = payload.get("examples") if isinstance(payload, dict) else payload
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path} has no examples: expected BIG-bench's {{'examples': [{{'input': ..., "
                        f"'target_scores': {{option: 0/1}}}}, ...]}}.")
    prefix = str(payload.get("task_prefix") or "") if isinstance(payload, dict) else ""
    return [_example(row, f"{path}, example {i}", prefix, task) for i, row in enumerate(rows)]


def _example(row: dict, where: str, prefix: str = "", task: str = "") -> ChoiceExample:
    if not isinstance(row, dict) or "input" not in row or not isinstance(row.get("target_scores"), dict):
        raise DataError(f"{where}: needs 'input' and 'target_scores' ({{option: 0 or 1}}).")
    scores = row["target_scores"]
    options = tuple(str(option) for option in scores)
    if len(options) < 2:
        raise DataError(f"{where}: has {len(options)} option(s); a multiple-choice question needs at least 2.")
    empty = [o for o in options if not o.strip()]
    if empty:
        raise DataError(f"{where}: has an empty option; every option needs text to be scored.")
    correct = [i for i, option in enumerate(scores) if float(scores[option]) == 1]
    if len(correct) != 1:
        raise DataError(f"{where}: has {len(correct)} correct options (target_scores equal to 1); exactly one "
                        "is needed.")
    prompt = PROMPT_TEMPLATE.format(input=(prefix + str(row["input"])).strip())
    return ChoiceExample(prompt, options, correct[0], where, task)


def split_examples(examples: Sequence[ChoiceExample], seed: int = 0,
                   fractions: dict[str, float] = SPLIT_FRACTIONS) -> dict[str, list[ChoiceExample]]:
    """Disjoint train / validation / test parts from one seeded permutation (sizes rounded down, train the rest)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    parts, start = {}, 0
    for name, fraction in fractions.items():
        size = int(len(examples) * fraction)
        parts[name] = sorted(order[start:start + size])
        start += size
    parts["train"] = sorted(order[start:])
    return {name: [examples[i] for i in indices] for name, indices in parts.items()}


def load_multiple_choice(train_file: str | Path, validation_file: str | Path | None = None,
                         split_seed: int = 0, name: str | None = None) -> MultipleChoiceTask:
    """One file, split by ``split_seed``; or a training file and a validation file used as they are."""
    source = str(train_file)
    if name is None:  # BIG-bench keeps each task in its own folder as task.json
        name = Path(train_file).parent.name if Path(train_file).name == "task.json" else Path(train_file).stem
    train = read_bigbench(train_file, name)
    if validation_file is not None:
        return MultipleChoiceTask(name, train, {"validation": read_bigbench(validation_file, name)}, source)
    parts = split_examples(train, split_seed)
    split = {"seed": split_seed, "fractions": dict(SPLIT_FRACTIONS), "sizes": {k: len(v) for k, v in parts.items()}}
    return MultipleChoiceTask(name, parts.pop("train"), parts, source, split=split)


# ---------------------------------------------------------------------------------------------- tokens
def encode_choices(example: ChoiceExample, tokenizer, max_length: int) -> list[tuple[list[int], int]]:
    """Per option: ``prompt + option`` token ids and how many trailing ids are the option's.

    Long prompts lose their start; an option longer than the window loses its end. Options whose tokens
    become identical that way cannot be told apart, and are refused.
    """
    prompt_ids = tokenizer(example.prompt)["input_ids"]
    encoded, seen = [], {}
    for i in range(len(example.options)):
        option_ids = tokenizer(example.continuation(i), add_special_tokens=False)["input_ids"][:max_length - 1]
        key = tuple(option_ids)
        if key in seen:
            raise DataError(f"{example.where}: options {example.options[seen[key]]!r} and {example.options[i]!r} are "
                            f"the same {len(option_ids)} tokens after truncation to --max-seq-length {max_length}; "
                            "raise it or shorten the options.")
        seen[key] = i
        ids = prompt_ids[-(max_length - len(option_ids)):] + option_ids
        encoded.append((ids, len(option_ids)))
    return encoded


def training_features(examples: Sequence[ChoiceExample], tokenizer, max_length: int) -> list[dict]:
    """Prompt -> correct option (+ EOS) with the loss on the answer tokens only."""
    from .causal_lm import tokenize_prompt_response

    for example in examples:
        encode_choices(example, tokenizer, max_length)  # refuse options indistinguishable after truncation
    pairs = [(example.prompt, example.continuation(example.answer)) for example in examples]
    return tokenize_prompt_response(pairs, tokenizer, max_length)  # response tokens = the scored option's tokens


Scored = tuple[int, int, list[int], int]  # question, option, prompt + option ids, how many trailing ids are the option's


@torch.no_grad()
def option_log_likelihoods(model, tokenizer, examples: Sequence[ChoiceExample], max_length: int = 256,
                           batch_size: int = 16, answer_logits: bool | None = None,
                           share_prompts: bool | None = None) -> list[list[float]]:
    """Summed log-probability of every option's tokens given the prompt, one forward per batch of options.

    ``share_prompts``: run each question's prompt once and score its options on the cached keys and values.
    The prompt is most of every (prompt, option) sequence, so this skips most of the work; a question whose
    options cut the prompt differently (truncation) is scored whole. ``answer_logits``: for sequences scored
    whole, project only the options' positions onto the vocabulary (left padding and ``logits_to_keep``,
    :class:`AnswerLogitsCollator`). Every path gives the same scores up to float summation order. None:
    wherever the model supports it."""
    if share_prompts is None:
        share_prompts = cache_keyword(model) is not None
    shared: list[tuple[int, list[int], list[list[int]]]] = []  # question, prompt ids, each option's ids
    whole: list[Scored] = []
    for e, example in enumerate(examples):
        encoded = encode_choices(example, tokenizer, max_length)  # refuses indistinguishable options
        prompt = _common_prompt(encoded) if share_prompts else None
        if prompt is not None:
            shared.append((e, prompt, [ids[len(prompt):] for ids, _ in encoded]))
        else:
            whole += [(e, o, ids, length) for o, (ids, length) in enumerate(encoded)]
    # longest first, so a batch pads to lengths like its own (1.3x fewer prompt tokens on the commonsense suite)
    # and a batch too large for memory fails at once; each score is written back at its question's index
    shared.sort(key=lambda question: -len(question[1]))
    whole.sort(key=lambda sequence: -len(sequence[2]))
    scores = [[0.0] * len(example.options) for example in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    try:
        _score_whole_sequences(model, whole, scores, pad, batch_size, answer_logits)
        _score_on_shared_prompts(model, shared, scores, pad, batch_size)
    finally:
        model.train(was_training)
    return scores


def _common_prompt(encoded: list[tuple[list[int], int]]) -> list[int] | None:
    """The prompt ids every option of a question continues, or None where truncation cut them differently."""
    prompts = {tuple(ids[:len(ids) - length]) for ids, length in encoded}
    prompt = next(iter(prompts))
    return list(prompt) if len(prompts) == 1 and prompt else None


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _score_whole_sequences(model, sequences: list[Scored], scores: list[list[float]], pad: int, batch_size: int,
                           answer_logits: bool | None) -> None:
    """Each (prompt + option) sequence in full, ``batch_size`` sequences a forward."""
    if answer_logits is None:
        collate = causal_lm_collator(model, pad)
    else:
        collate = (AnswerLogitsCollator if answer_logits else PaddingCollator)(pad_token_id=pad)
    device = _device(model)
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        # labels mark each option's tokens, so the answer-only collator keeps just the logits they need
        inputs = collate([{"input_ids": ids, "attention_mask": [1] * len(ids),
                           "labels": [-100] * (len(ids) - length) + ids[len(ids) - length:]}
                          for _, _, ids, length in batch])
        labels = inputs.pop("labels")
        logits = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}).logits.float()
        right_padded = collate.padding_side == "right"
        for row, (e, o, ids, option_length) in enumerate(batch):
            end = len(ids) if right_padded else logits.shape[1]  # one past the option's last token
            # position t predicts token t+1: the option's L tokens are predicted at end-L-1 .. end-2
            predicted = logits[row, end - option_length - 1:end - 1].log_softmax(-1)
            targets = labels[row, end - option_length:end].to(predicted.device)
            scores[e][o] = float(predicted.gather(1, targets[:, None]).sum())


def _question_groups(questions: list, batch_size: int) -> list[list]:
    """Consecutive questions with at most ``batch_size`` options in all (at least one question a group)."""
    groups, current, count = [], [], 0
    for question in questions:
        options = len(question[2])
        if current and count + options > batch_size:
            groups.append(current)
            current, count = [], 0
        current.append(question)
        count += options
    return groups + [current] if current else groups


def _score_on_shared_prompts(model, questions: list[tuple[int, list[int], list[list[int]]]],
                             scores: list[list[float]], pad: int, batch_size: int) -> None:
    """Two forwards a group of questions: the prompts (left-padded, keeping their keys and values and the
    logits of their last position, which predict every option's first token), then all their options
    (right-padded) on the prompt cache repeated once per option, at the positions that follow each prompt."""
    device = _device(model)
    cache_name = cache_keyword(model)
    if questions and cache_name is None:
        raise ValueError(f"{type(model).__name__} takes no cache of keys and values: score with share_prompts=False")
    last_only = {"logits_to_keep": 1} if keeps_logits(model) else {}
    left, right = PaddingCollator(pad, padding_side="left"), PaddingCollator(pad)
    for group in _question_groups(questions, batch_size):
        prompts = {k: v.to(device) for k, v in left([{"input_ids": p, "attention_mask": [1] * len(p)}
                                                      for _, p, _ in group]).items()}
        prompt_mask = prompts["attention_mask"]
        out = model(**prompts, position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, **last_only)
        first = out.logits[:, -1].float().log_softmax(-1)  # predicts each option's first token
        rows = torch.tensor([q for q, (_, _, options) in enumerate(group) for _ in options], device=device)
        cache = getattr(out, cache_name)
        cache.reorder_cache(rows)  # one copy of the question's prompt per option
        options = right([{"input_ids": ids, "attention_mask": [1] * len(ids)} for _, _, option_ids in group
                         for ids in option_ids])
        option_ids, option_mask = options["input_ids"].to(device), options["attention_mask"].to(device)
        positions = prompt_mask.sum(-1)[rows, None] + torch.arange(option_ids.shape[1], device=device)
        logits = model(input_ids=option_ids, attention_mask=torch.cat([prompt_mask[rows], option_mask], dim=1),
                       position_ids=positions, use_cache=True, **{cache_name: cache}).logits.float()
        row = 0
        for q, (e, _, option_list) in enumerate(group):
            for o, ids in enumerate(option_list):
                # token 0 is predicted by the prompt's last position, token t > 0 by option position t - 1
                later = logits[row, :len(ids) - 1].log_softmax(-1).gather(1, option_ids[row, 1:len(ids), None])
                scores[e][o] = float(first[q, ids[0]] + later.sum())
                row += 1


def load_suite(files: dict[str, str | Path], split_seed: int = 0) -> MultipleChoiceTask:
    """Several tasks as one: each file split by ``split_seed`` exactly as it would be alone, the training parts
    joined (a multi-task training set), the validation and test parts joined in task order; each example keeps
    its task, so the metrics are reported per task and pooled (:func:`choice_metrics_by_task`)."""
    if len(files) < 2:
        raise DataError("A suite needs at least two tasks.")
    tasks = [load_multiple_choice(path, None, split_seed, name=name) for name, path in files.items()]
    evaluation = {part: [e for task in tasks for e in task.evaluation[part]] for part in SPLIT_FRACTIONS}
    split = {"seed": split_seed, "fractions": dict(SPLIT_FRACTIONS),
             "per_task": {t.name: t.split["sizes"] for t in tasks},
             "sizes": {"train": sum(len(t.train) for t in tasks), **{k: len(v) for k, v in evaluation.items()}}}
    return MultipleChoiceTask("+".join(files), [e for task in tasks for e in task.train], evaluation,
                              ",".join(str(p) for p in files.values()), split=split)


def choice_metrics_by_task(examples: Sequence[ChoiceExample], scores: Sequence[Sequence[float]]) -> dict:
    """:func:`choice_metrics` of all the questions, and, when they come from several tasks, of each task's
    (``per_task``: its metrics, its ``balanced_acc`` and question count); and ``macro_balanced_acc``, the mean
    of the tasks' balanced accuracies (:func:`balanced_weights`), which a constant answer cannot move."""
    metrics: dict = choice_metrics(examples, scores)
    hits = answer_hits(examples, scores)
    weights = balanced_weights(examples)
    metrics["macro_balanced_acc"] = sum(w * hit for w, hit in zip(weights, hits))
    tasks = list(dict.fromkeys(e.task for e in examples))
    if len(tasks) > 1:
        metrics["per_task"] = {}
        for task in tasks:
            chosen = [i for i, e in enumerate(examples) if e.task == task]
            metrics["per_task"][task] = {**choice_metrics([examples[i] for i in chosen], [scores[i] for i in chosen]),
                                         "balanced_acc": len(tasks) * sum(weights[i] * hits[i] for i in chosen),
                                         "questions": len(chosen)}
    return metrics


def _has_fixed_answers(examples: Sequence[ChoiceExample]) -> bool:
    """Do all these questions offer the same answers (winowhy's correct / incorrect)? Then a run can answer
    one of them throughout without reading the question, and its accuracy is that answer's share."""
    return len({frozenset(option.strip() for option in e.options) for e in examples}) == 1


def balanced_weights(examples: Sequence[ChoiceExample]) -> list[float]:
    """Each question's weight in the macro-averaged balanced accuracy, so that the score is
    ``sum(weight * hit)`` (one number per run, and a paired test between runs can flip hits question by question).

    Every task weighs the same. Within a task whose questions all offer the same answers, each right answer
    weighs the same (balanced accuracy, scikit-learn's ``balanced_accuracy_score`` over the right answers'
    texts): a run that gives one answer to every question scores exactly chance, whichever answer it is.
    Within a task whose questions each have their own options (social_iqa), no answer can be repeated
    blindly and every question weighs the same (plain accuracy). On one such task the score is ``acc``.
    """
    by_task: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        by_task.setdefault(example.task, []).append(i)
    weights = [0.0] * len(examples)
    for members in by_task.values():
        task_examples = [examples[i] for i in members]
        if _has_fixed_answers(task_examples):
            right = [e.options[e.answer].strip() for e in task_examples]
            counts = Counter(right)
            for i, text in zip(members, right):
                weights[i] = 1.0 / (len(by_task) * len(counts) * counts[text])
        else:
            for i in members:
                weights[i] = 1.0 / (len(by_task) * len(members))
    return weights


def choice_metrics(examples: Sequence[ChoiceExample], scores: Sequence[Sequence[float]]) -> dict[str, float]:
    """``acc`` (highest summed log-likelihood), ``acc_norm`` (per character of the option, with its leading
    space, as lm-evaluation-harness does) and the mean per-example negative log-likelihood of the answer."""
    hits = sum(answer_hits(examples, scores))
    hits_norm = 0
    nll = 0.0
    for example, option_scores in zip(examples, scores):
        lengths = [len(example.continuation(i)) for i in range(len(example.options))]
        hits_norm += _argmax([s / n for s, n in zip(option_scores, lengths)]) == example.answer
        nll -= option_scores[example.answer]
    n = max(len(examples), 1)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "answer_nll": nll / n}


def chosen_options(scores: Sequence[Sequence[float]]) -> list[int]:
    """Per question, the option with the highest summed log-likelihood (``acc``'s answer; ties go to the first,
    -1 when the scores are NaN): what a run answered, right or wrong."""
    return [_argmax(option_scores) for option_scores in scores]


def answer_hits(examples: Sequence[ChoiceExample], scores: Sequence[Sequence[float]]) -> list[bool]:
    """Per question: does the highest summed log-likelihood fall on the right option (``acc``)? Two runs scored
    on the same questions are compared question by question through this."""
    return [chosen == example.answer for example, chosen in zip(examples, chosen_options(scores))]


def _argmax(values: Sequence[float]) -> int:
    best = max(values)
    return next(i for i, v in enumerate(values) if v == best) if not math.isnan(best) else -1
