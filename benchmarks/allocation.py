"""Where a mask's budget goes: `sparsepeft mask` on a real model and task, its allocation recorded.

    python benchmarks/allocation.py --out docs/results/allocation.json

Each case is one `sparsepeft mask` command (the shipped selection, and the blocks' linear weights at LoRA r=8's
count); the file keeps each mask's allocation (per module type, per block, top tensors, the embedding's
vocabulary rows and their tokens) with the command, commit and versions. Cases whose output folder already
holds a mask_summary.json are not recomputed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, write_json  # noqa: E402

LLM_TARGETS = "lora:r=8,target_modules=q_proj+k_proj+v_proj+o_proj+up_proj+down_proj"
CASES = {  # name: (model, task, data dir, flags)
    "minilm-sst2-fish": ("minilm", "sst2", "glue", ["--method", "fish", "--keep-ratio", "0.005"]),
    "minilm-sst2-fish-linear-lora8": ("minilm", "sst2", "glue", ["--method", "fish", "--budget", "lora:r=8",
                                                                 "--candidates", "linear"]),
    "smollm2-siqa-fish": ("smollm2-135m", "social_iqa", "bigbench", ["--method", "fish", "--keep-ratio", "0.005",
                                                                      "--always-train", ""]),
    "smollm2-siqa-fish-linear-lora8": ("smollm2-135m", "social_iqa", "bigbench", [
        "--method", "fish", "--budget", LLM_TARGETS, "--candidates", "linear", "--always-train", ""]),
    # the suite's FISH as shipped (docs/selection.md): its sequences (256) and samples, at LoRA r=8's count
    "smollm2-suite-fish-lora8": ("smollm2-135m", "social_iqa,winowhy,timedial,epistemic_reasoning", "bigbench", [
        "--method", "fish", "--budget", LLM_TARGETS, "--always-train", "", "--max-seq-length", "256",
        "--fisher-batch-size", "8"]),
}


def recount_embedding_rows(folder: Path, model_name: str, data: str) -> dict | None:
    """The CLI's embedding-rows report for a case's saved mask, for masks made before mask_summary.json kept it
    (or kept fewer rows): the same function on the same mask and model, without a second Fisher pass."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from sparsepeft.models.catalog import resolve_model
    from sparsepeft.selection import SparseMask
    from sparsepeft.selection.mask import embedding_rows

    path = resolve_model(model_name)
    model_class = AutoModelForCausalLM if data == "bigbench" else AutoModelForSequenceClassification
    model = model_class.from_pretrained(path)
    mask = SparseMask.load(folder / "sparse_mask.safetensors")
    return embedding_rows(mask, model, AutoTokenizer.from_pretrained(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--num-samples", type=int, default=512)
    parser.add_argument("--work", default="runs/allocation")
    parser.add_argument("--out", default="docs/results/allocation.json")
    args = parser.parse_args()
    results = {}
    for name in args.cases.split(","):
        model, task, data, flags = CASES[name]
        folder = Path(args.work) / name
        command = [sys.executable, "-m", "sparsepeft", "mask", "--model", model, "--task", task, "--data-dir",
                   str(Path(args.data_root) / data), "--num-samples", str(args.num_samples), "--max-seq-length", "128",
                   "--report-to", "none", "--output-dir", str(folder), *flags]
        if not (folder / "mask_summary.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "mask.log", "w") as log:
                subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
            write_json(folder / "provenance.json", provenance(command))
        summary = json.loads((folder / "mask_summary.json").read_text())
        results[name] = {"allocation": summary["allocation"], "config": summary["config"],
                         "embedding_rows": recount_embedding_rows(folder, model, data),
                         "mask_seconds": summary.get("mask_seconds"),
                         "provenance": json.loads((folder / "provenance.json").read_text())}
        top = summary["allocation"]["top_tensors"][0]
        print(f"{name}: {summary['allocation']['num_selected']:,} entries; {100 * top['share']:.1f}% in {top['name']}",
              flush=True)
    write_json(args.out, {"provenance": provenance(), "cases": results})


if __name__ == "__main__":
    main()
