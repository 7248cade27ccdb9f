"""BIG-bench multiple choice: reading and checking, the fixed split, option log-likelihood scoring, the CLI."""

import json

import pytest
import torch

from conftest import WORDS
from sparsepeft.cli.main import main
from sparsepeft.data import DataError
from sparsepeft.data.multiple_choice import (choice_metrics, choice_metrics_by_task, encode_choices, load_multiple_choice,
                                             option_log_likelihoods, read_bigbench, split_examples,
                                             training_features)


def _write_task(path, n: int = 40, **overrides):
    """A BIG-bench-format file: three options per question, the right one chosen by a simple rule."""
    examples = []
    for i in range(n):
        options = [WORDS[(i + k) % len(WORDS)] + " " + WORDS[(3 * i + k) % len(WORDS)] for k in range(3)]
        examples.append({"input": f"the {WORDS[i % len(WORDS)]} movie was ", "target_scores":
                         {option: int(k == i % 3) for k, option in enumerate(options)}})
    examples[overrides.pop("at", 0)].update(overrides)
    path.write_text(json.dumps({"canary": "test data written by the test", "examples": examples}))
    return path


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_lm_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_lm_dir)


# prompts once on a cache / whole sequences, left padding, answer positions only / whole, right padding, all
@pytest.mark.parametrize("share_prompts, answer_logits", [(True, None), (False, True), (False, False)])
def test_option_scores_equal_a_hand_computed_log_likelihood(tmp_path, tiny_lm, share_prompts, answer_logits):
    model, tokenizer = tiny_lm
    examples = read_bigbench(_write_task(tmp_path / "task.json", 5))
    scores = option_log_likelihoods(model, tokenizer, examples, max_length=64, batch_size=4,  # batches cut across questions
                                    answer_logits=answer_logits, share_prompts=share_prompts)
    for example, option_scores in zip(examples, scores):
        for option, score in enumerate(option_scores):
            prompt = tokenizer(example.prompt)["input_ids"]
            answer = tokenizer(" " + example.options[option], add_special_tokens=False)["input_ids"]
            with torch.no_grad():  # one unpadded sequence, the log-probability of each answer token summed by hand
                log_probs = model(input_ids=torch.tensor([prompt + answer])).logits[0].double().log_softmax(-1)
            expected = sum(float(log_probs[len(prompt) - 1 + t, token]) for t, token in enumerate(answer))
            assert score == pytest.approx(expected, abs=1e-4)


class _TokenCounter:
    """Counts the input tokens a model's forwards read (how much work a scoring path does)."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        self.tokens += int(kwargs["input_ids"].numel())


@pytest.mark.parametrize("family", ["llama", "gpt2", "llama+lora"])
def test_shared_prompts_score_as_whole_sequences_do_for_less_work(tmp_path, tiny_lm, family, monkeypatch):
    """The prompt cache, repeated per option at the positions after each prompt, gives every option the score
    the whole sequence gives it, with prompts of different lengths in one batch and batches cut between
    questions; truncation that cuts a question's prompt differently per option falls back to whole sequences."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from sparsepeft.data import multiple_choice
    from sparsepeft.data.collate import cache_keyword

    llama, tokenizer = tiny_lm
    torch.manual_seed(3)
    model = llama if family.startswith("llama") else GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=2, n_head=2, pad_token_id=0)).eval()
    if family == "llama+lora":  # as the CLI scores a tuned model: through PEFT's wrapper
        import copy

        from sparsepeft.models.peft import apply_method

        model = apply_method(copy.deepcopy(llama), "lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]})
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)  # a LoRA that changes the scores
        model.eval()
    path = _write_task(tmp_path / "task.json", 9)
    data = json.loads(path.read_text())
    for k, example in enumerate(data["examples"]):  # prompts of different lengths, options of 2 and 3 tokens
        example["input"] = " ".join(WORDS[(k + j) % len(WORDS)] for j in range(2 + 3 * k))
        first, *rest = example["target_scores"].items()
        example["target_scores"] = {first[0] + " " + WORDS[k]: first[1], **dict(rest)}
    path.write_text(json.dumps(data))
    examples = read_bigbench(path)
    assert cache_keyword(model) is not None
    scored_whole = []
    score_whole = multiple_choice._score_whole_sequences
    monkeypatch.setattr(multiple_choice, "_score_whole_sequences",
                        lambda model, sequences, *args: scored_whole.append({s[0] for s in sequences})
                        or score_whole(model, sequences, *args))
    counters, results = [], []
    for share in (False, True):
        counters.append(_TokenCounter(model))
        results.append(option_log_likelihoods(model, tokenizer, examples, max_length=40, batch_size=5,
                                              share_prompts=share))
        counters[-1].handle.remove()
    whole, shared = results
    # the prompt is cut to 37 tokens before a 3-token option and to 38 before 2-token ones
    cut_differently = {i for i, e in enumerate(examples) if len(tokenizer(e.prompt)["input_ids"]) > 37}
    assert scored_whole == [set(range(len(examples))), cut_differently] and 0 < len(cut_differently) < len(examples)
    for w, s in zip(whole, shared):
        assert s == pytest.approx(w, abs=1e-4)
    assert counters[1].tokens < 0.8 * counters[0].tokens


@pytest.mark.parametrize("share_prompts", [True, False])
def test_questions_are_batched_longest_first_and_score_as_they_do_alone(tmp_path, tiny_lm, share_prompts):
    """Batches hold questions of like length (less padding: the suite mixes short social_iqa prompts with long
    timedial ones), and every score is still the one the question gets scored on its own."""
    model, tokenizer = tiny_lm
    path = _write_task(tmp_path / "task.json", 12)
    data = json.loads(path.read_text())
    for k, example in enumerate(data["examples"]):  # prompt lengths out of order: 2 .. 35 words
        example["input"] = " ".join(WORDS[(k + j) % len(WORDS)] for j in range(2 + (7 * k) % 12 * 3))
    path.write_text(json.dumps(data))
    examples = read_bigbench(path)
    widths = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        batched = option_log_likelihoods(model, tokenizer, examples, max_length=64, batch_size=6,
                                         share_prompts=share_prompts)
    finally:
        handle.remove()
    firsts = widths[::2] if share_prompts else widths  # shared: a prompt forward, then its options' forward
    assert firsts == sorted(firsts, reverse=True) and len(set(firsts)) > 2
    for example, scores in zip(examples, batched):
        alone = option_log_likelihoods(model, tokenizer, [example], max_length=64, batch_size=6,
                                       share_prompts=share_prompts)[0]
        assert scores == pytest.approx(alone, abs=1e-4)


def test_acc_and_acc_norm_follow_lm_evaluation_harness():
    from sparsepeft.data.multiple_choice import ChoiceExample

    example = ChoiceExample("Q", ("a", "longer answer"), answer=1)
    # summed: "a" wins (-2 > -6); per character of " a" (2) and " longer answer" (14): -1 < -0.43, the long one wins
    metrics = choice_metrics([example], [[-2.0, -6.0]])
    assert metrics == {"acc": 0.0, "acc_norm": 1.0, "answer_nll": 6.0}


def test_the_split_is_fixed_disjoint_and_independent_of_the_training_seed(tmp_path):
    path = _write_task(tmp_path / "task.json", 50)
    first, again = load_multiple_choice(path), load_multiple_choice(path)
    parts = [first.train, first.evaluation["validation"], first.evaluation["test"]]
    assert [len(p) for p in parts] == [35, 5, 10]
    assert [e.where for e in first.train] == [e.where for e in again.train]
    keys = [{e.where for e in part} for part in parts]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert len(keys[0] | keys[1] | keys[2]) == 50
    other = split_examples(read_bigbench(path), seed=1)
    assert {e.where for e in other["test"]} != keys[2]  # another split seed, another split
    assert first.split == {"seed": 0, "fractions": {"validation": 0.1, "test": 0.2},
                           "sizes": {"validation": 5, "test": 10, "train": 35}}


def test_training_features_put_the_loss_on_the_correct_option_only(tmp_path, tiny_lm):
    _, tokenizer = tiny_lm
    example = read_bigbench(_write_task(tmp_path / "task.json", 3))[1]
    feature = training_features([example], tokenizer, 64)[0]
    answer = tokenizer(" " + example.options[example.answer], add_special_tokens=False)["input_ids"]
    labelled = [t for t in feature["labels"] if t != -100]
    assert labelled == answer + [tokenizer.eos_token_id]
    assert feature["input_ids"][-len(labelled):] == labelled


@pytest.mark.parametrize("override,message", [
    ({"target_scores": {"yes": 0, "no": 0}}, "has 0 correct options"),
    ({"target_scores": {"yes": 1, "no": 1, "maybe": 0}}, "has 2 correct options"),
    ({"target_scores": {"yes": 1, " ": 0}}, "empty option"),
    ({"target_scores": {"yes": 1}}, "at least 2"),
])
def test_bad_questions_are_clear_errors_naming_the_example(tmp_path, override, message):
    path = _write_task(tmp_path / "task.json", 6, at=4, **override)
    with pytest.raises(DataError, match=message) as error:
        read_bigbench(path)
    assert "example 4" in str(error.value)


def test_options_equal_after_truncation_are_refused(tmp_path, tiny_lm):
    _, tokenizer = tiny_lm
    path = _write_task(tmp_path / "task.json", 3, at=2,
                       target_scores={"good movie bad": 1, "good movie great": 0, "dog": 0})
    example = read_bigbench(path)[2]
    encode_choices(example, tokenizer, 64)  # distinct at full length
    with pytest.raises(DataError, match="example 2.*same 2 tokens after truncation"):
        encode_choices(example, tokenizer, 3)


def test_cli_trains_and_scores_multiple_choice_end_to_end(tiny_llama_lm_dir, tmp_path, capsys):
    path = _write_task(tmp_path / "task.json", 40)
    common = ["train", "--model", str(tiny_llama_lm_dir), "--task-type", "multiple-choice", "--train-file", str(path),
              "--max-seq-length", "48", "--per-device-train-batch-size", "4", "--report-to", "none",
              "--save-strategy", "no", "--disable-tqdm", "true", "--use-cpu", "true"]
    assert main([*common, "--method", "full", "--max-steps", "0", "--output-dir", str(tmp_path / "zero")]) == 0
    assert main([*common, "--method", "lora", "--lora-r", "4", "--max-steps", "30", "--learning-rate", "1e-2",
                 "--output-dir", str(tmp_path / "lora")]) == 0
    zero = json.loads((tmp_path / "zero" / "results.json").read_text())
    lora = json.loads((tmp_path / "lora" / "results.json").read_text())
    assert set(zero["metrics"]) == {"validation", "test"} and zero["data_split"]["sizes"]["test"] == 8
    for split in ("validation", "test"):
        assert {"acc", "acc_norm", "answer_nll", "macro_balanced_acc"} == set(lora["metrics"][split])
    assert zero["train_steps"] == 0 and lora["train_steps"] == 30
    # each question's option log-likelihoods are kept, in the split's order: they give back the metrics, and two
    # runs can be compared question by question
    parts = split_examples(read_bigbench(path), seed=0)
    for run in (zero, lora):
        for split in ("validation", "test"):
            scores = run["option_log_likelihoods"][split]
            assert len(scores) == len(parts[split]) and all(len(s) == 3 for s in scores)
            assert choice_metrics_by_task(parts[split], scores) == pytest.approx(run["metrics"][split], abs=0)
    assert zero["option_log_likelihoods"]["test"] != lora["option_log_likelihoods"]["test"]
    # training on the answers lowers their negative log-likelihood on held-out questions
    assert lora["metrics"]["test"]["answer_nll"] < zero["metrics"]["test"]["answer_nll"]
    # a bad file is refused before anything is written
    bad = _write_task(tmp_path / "bad.json", 6, at=3, target_scores={"a": 1, "b": 1})
    assert main([*common, "--method", "lora", "--train-file", str(bad), "--output-dir", str(tmp_path / "bad")]) == 2
    assert "example 3" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_task_prefix_starts_every_prompt(tmp_path):
    path = _write_task(tmp_path / "task.json", 4)
    payload = json.loads(path.read_text())
    payload["task_prefix"] = "Decide whether the reason is right.\n"
    path.write_text(json.dumps(payload))
    prompts = [e.prompt for e in read_bigbench(path)]
    assert all(p.startswith("Question: Decide whether the reason is right.\nthe ") for p in prompts)


def test_a_suite_trains_on_every_tasks_training_part_and_reports_each_task(tiny_llama_lm_dir, tmp_path, capsys,
                                                                            caplog):
    for name, n in (("alpha", 30), ("beta", 20)):
        (tmp_path / name).mkdir()
        _write_task(tmp_path / name / "task.json", n)
    from sparsepeft.data.multiple_choice import load_suite

    suite = load_suite({"alpha": tmp_path / "alpha" / "task.json", "beta": tmp_path / "beta" / "task.json"})
    alone = load_multiple_choice(tmp_path / "beta" / "task.json")
    assert [e.where for e in suite.train if e.task == "beta"] == [e.where for e in alone.train]  # the same split
    assert [e.task for e in suite.evaluation["test"]] == ["alpha"] * 6 + ["beta"] * 4
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_lm_dir), "--task", "alpha,beta", "--data-dir", str(tmp_path),
                 "--method", "lora", "--lora-r", "2", "--max-steps", "2", "--max-seq-length", "48",
                 "--per-device-train-batch-size", "4", "--report-to", "none", "--save-strategy", "no",
                 "--use-cpu", "true", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    test = results["metrics"]["test"]
    assert set(test["per_task"]) == {"alpha", "beta"} and test["per_task"]["alpha"]["questions"] == 6
    pooled = (6 * test["per_task"]["alpha"]["acc"] + 4 * test["per_task"]["beta"]["acc"]) / 10
    assert test["acc"] == pytest.approx(pooled)
    assert results["train_samples"] == len(suite.train)
    assert "--shuffle-length-groups" not in caplog.text  # Trainer's random sampler: no curriculum to warn about
    grouped = tmp_path / "grouped"
    assert main(["train", "--model", str(tiny_llama_lm_dir), "--task", "alpha,beta", "--data-dir", str(tmp_path),
                 "--method", "lora", "--lora-r", "2", "--max-steps", "1", "--max-seq-length", "48",
                 "--per-device-train-batch-size", "4", "--report-to", "none", "--save-strategy", "no",
                 "--use-cpu", "true", "--train_sampling_strategy", "group_by_length", "--output-dir", str(grouped)]) == 0
    assert "union of 2 tasks" in caplog.text and "--shuffle-length-groups" in caplog.text
    assert main(["train", "--model", str(tiny_llama_lm_dir), "--task", "alpha,gamma", "--data-dir", str(tmp_path),
                 "--output-dir", str(tmp_path / "bad"), "--report-to", "none"]) == 2
    assert "gamma" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_validation_during_training_of_multiple_choice_is_refused_before_any_work(tiny_llama_lm_dir, tmp_path, capsys):
    """Options are scored outside Trainer, so --eval-strategy cannot run there: a clear error, nothing written."""
    path = _write_task(tmp_path / "task.json", 20)
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_llama_lm_dir), "--task-type", "multiple-choice", "--train-file", str(path),
                 "--method", "fish", "--eval-strategy", "steps", "--eval-steps", "5", "--output-dir", str(out),
                 "--report-to", "none", "--use-cpu", "true"]) == 2
    err = capsys.readouterr().err
    assert "--eval-strategy" in err and "multiple-choice" in err and "Traceback" not in err
    assert not out.exists()
