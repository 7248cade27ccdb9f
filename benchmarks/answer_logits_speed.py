"""Answer-only logits against full logits on SmolLM2-135M: training step time and multiple-choice
evaluation time, side by side in one process, on the LLM track's social_iqa batches.

    python benchmarks/answer_logits_speed.py --out docs/results/answer_logits_speed_cpu.json

The LLM track's loss reads the answer tokens only, but a causal LM projects every position onto its
49k-token vocabulary. ``AnswerLogitsCollator`` left-pads, passes position ids and asks the model for the
logits of the answer positions alone (``logits_to_keep``). This script times both collators on the same
batches (one untimed warm-up step each, then the two take turns batch by batch, ``--steps`` batches per
round, ``--repeats`` rounds) for LoRA r=8 on q,k,v,o,up,down and for full fine-tuning, with dropout off so
that the two copies see the same arithmetic; it reports the ratio of median step times and the median of
the per-batch ratios, checks that the two losses agree, and times option scoring on ``--eval-questions``
validation questions both ways.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, write_json  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def load(args):
    from sparsepeft.data.multiple_choice import load_multiple_choice, training_features
    from sparsepeft.experiments.pipeline import load_model_and_tokenizer

    task = load_multiple_choice(Path(args.data_dir) / "social_iqa" / "task.json")
    model, tokenizer = load_model_and_tokenizer(args.model, task)
    features = training_features(task.train[: args.batch_size * args.steps], tokenizer, 128)
    return task, model, tokenizer, features


def arm_model(base, arm: str):
    from sparsepeft.models.peft import apply_method

    model = copy.deepcopy(base)
    if arm == "lora":
        model = apply_method(model, "lora", {"r": 8, "lora_alpha": 16, "target_modules": TARGETS, "lora_dropout": 0.0})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, optimizer


def step(model, optimizer, batch) -> tuple[float, float]:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data/bigbench")
    parser.add_argument("--arms", default="lora,full")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-questions", type=int, default=24)
    parser.add_argument("--out", default="docs/results/answer_logits_speed_cpu.json")
    args = parser.parse_args()

    from sparsepeft.data.collate import AnswerLogitsCollator, PaddingCollator
    from sparsepeft.data.multiple_choice import option_log_likelihoods

    task, base, tokenizer, features = load(args)
    collators = {"full_logits": PaddingCollator(tokenizer.pad_token_id),
                 "answer_logits": AnswerLogitsCollator(tokenizer.pad_token_id)}
    batches = [features[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.steps)]
    report = {"provenance": provenance(sys.argv), "config": vars(args), "training": {}, "evaluation": {}}

    for arm in args.arms.split(","):
        torch.manual_seed(0)
        models = {name: arm_model(base, arm) for name in collators}  # identical copies, one per collator
        first = {}  # warm-up step, untimed (first-step allocations); the copies are still identical here
        for name, collate in collators.items():
            first[name] = step(*models[name], collate(batches[0]))[1]
        times = {name: [] for name in collators}
        losses = {name: [] for name in collators}
        for repeat in range(args.repeats):
            for i, batch in enumerate(batches):
                order = list(collators.items())
                if (repeat * len(batches) + i) % 2:  # alternate which goes first
                    order.reverse()
                for name, collate in order:
                    seconds, loss = step(*models[name], collate(batch))
                    times[name].append(seconds)
                    losses[name].append(loss)
        medians = {name: statistics.median(t) for name, t in times.items()}
        paired = [a / f for a, f in zip(times["answer_logits"], times["full_logits"])]
        report["training"][arm] = {
            "median_step_seconds": medians, "step_seconds": times, "losses": losses,
            "answer_over_full": medians["answer_logits"] / medians["full_logits"],
            "answer_over_full_paired_median": statistics.median(paired),
            "first_step_loss": first, "first_step_loss_difference": abs(first["full_logits"] - first["answer_logits"]),
            # later steps: Adam moves entries whose gradient is ~0 by ±lr whatever its float-level sign, so
            # the two copies drift apart by more than the float noise of one step
            "max_loss_difference_later_steps": max(abs(a - b) for a, b in zip(losses["full_logits"],
                                                                              losses["answer_logits"])),
        }
        print(f"{arm}: answer-only / full logits step time {report['training'][arm]['answer_over_full']:.3f}, "
              f"per-batch median {report['training'][arm]['answer_over_full_paired_median']:.3f} "
              f"(medians {medians}); first-step loss difference {report['training'][arm]['first_step_loss_difference']:.2e}",
              flush=True)
        del models

    questions = task.evaluation["validation"][: args.eval_questions]
    base.eval()
    seconds, scores = {name: 0.0 for name in collators}, {}
    for name in [*collators, *reversed(collators)]:  # full, answer, answer, full: order effects cancel
        start = time.perf_counter()
        scores[name] = option_log_likelihoods(base, tokenizer, questions, 128, 24,
                                              answer_logits=name == "answer_logits", share_prompts=False)
        seconds[name] += time.perf_counter() - start
    difference = max(abs(a - b) for x, y in zip(scores["full_logits"], scores["answer_logits"]) for a, b in zip(x, y))
    report["evaluation"] = {"seconds": seconds, "answer_over_full": seconds["answer_logits"] / seconds["full_logits"],
                            "max_log_likelihood_difference": difference, "questions": len(questions)}
    print(f"evaluation: answer-only / full logits {report['evaluation']['answer_over_full']:.3f} ({seconds}); "
          f"largest option log-likelihood difference {difference:.2e}", flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
