"""Multiple-choice scoring on SmolLM2-135M: each prompt once on a cache of keys and values, against every
(prompt, option) sequence whole, side by side in one process on the LLM track's social_iqa questions.

    python benchmarks/option_scoring_speed.py --out docs/results/option_scoring_speed_cpu.json

Both paths score the same options (whole sequences with answer-only logits, the path before prompts were
shared). The two take turns, ``--repeats`` rounds of ``--questions`` validation questions each, in
alternating order so that order effects cancel; the script reports the median of the per-round time
ratios, the largest difference between the two paths' option log-likelihoods, and whether ``acc`` and
``acc_norm`` agree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, write_json  # noqa: E402

PATHS = {"whole": False, "shared": True}  # name -> share_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default="../shared/data/bigbench")
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=24, help="options a forward (the LLM track's eval batch)")
    parser.add_argument("--out", default="docs/results/option_scoring_speed_cpu.json")
    args = parser.parse_args()

    from sparsepeft.data.multiple_choice import choice_metrics, load_multiple_choice, option_log_likelihoods
    from sparsepeft.experiments.pipeline import load_model_and_tokenizer

    task = load_multiple_choice(Path(args.data_dir) / "social_iqa" / "task.json")
    model, tokenizer = load_model_and_tokenizer(args.model, task)
    model.eval()
    questions = task.evaluation["validation"][: args.questions]
    seconds: dict[str, list[float]] = {name: [] for name in PATHS}
    scores = {}
    with torch.no_grad():
        option_log_likelihoods(model, tokenizer, questions[:4], 128, args.batch_size)  # warm-up
        for repeat in range(args.repeats):
            order = list(PATHS) if repeat % 2 == 0 else list(reversed(PATHS))
            for name in order:
                start = time.perf_counter()
                scores[name] = option_log_likelihoods(model, tokenizer, questions, 128, args.batch_size,
                                                      answer_logits=True, share_prompts=PATHS[name])
                seconds[name].append(time.perf_counter() - start)
    ratios = [s / w for s, w in zip(seconds["shared"], seconds["whole"])]
    difference = max(abs(a - b) for x, y in zip(scores["whole"], scores["shared"]) for a, b in zip(x, y))
    metrics = {name: choice_metrics(questions, scores[name]) for name in PATHS}
    tokens = {"prompt": statistics.mean(len(tokenizer(q.prompt)["input_ids"]) for q in questions),
              "option": statistics.mean(len(tokenizer(q.continuation(i), add_special_tokens=False)["input_ids"])
                                        for q in questions for i in range(len(q.options)))}
    report = {"provenance": provenance(sys.argv), "questions": len(questions), "repeats": args.repeats,
              "batch_size": args.batch_size, "seconds": seconds, "shared_over_whole_per_round": ratios,
              "shared_over_whole_median": statistics.median(ratios), "mean_tokens": tokens,
              "max_log_likelihood_difference": difference, "metrics": metrics,
              "same_accuracies": metrics["whole"]["acc"] == metrics["shared"]["acc"]
              and metrics["whole"]["acc_norm"] == metrics["shared"]["acc_norm"]}
    print(f"shared / whole scoring time: median {report['shared_over_whole_median']:.3f} (rounds {ratios}); "
          f"largest log-likelihood difference {difference:.2e}; same accuracies: {report['same_accuracies']}; "
          f"mean tokens {tokens}", flush=True)
    write_json(args.out, report)


if __name__ == "__main__":
    main()
