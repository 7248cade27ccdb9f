"""Entry point: ``sparsepeft {train,mask,demo} [flags]``; ``sparsepeft train --help`` lists every flag."""

from __future__ import annotations

import logging
import sys

USAGE = """usage: sparsepeft {train,mask,merge,export-shira,demo} [flags]

  train   fine-tune (--method full|fish|random, or a PEFT method: lora|dora|adapter|ia3|... [--fish --budget lora:r=8]
          [--layers ist|lisa|random|full --layers-fraction 0.25]; --task-type causal-lm for prompt/response files)
          and write the model (or adapter), the mask and results.json
  mask    compute and save a mask only (sparse_mask.safetensors, mask_density.png, mask_summary.json)
  merge   base model + sparse_delta.safetensors -> a dense checkpoint: merge --model BASE --delta D --output-dir OUT
  export-shira  the same delta as a PEFT SHiRA adapter folder (PeftModel.from_pretrained loads it), where it fits:
          export-shira --model BASE --delta D --output-dir OUT
  demo    FISH Mask vs full fine-tuning of the packaged MiniLM on the packaged data (offline, minutes)

Run `sparsepeft train --help` for every flag (all of transformers' TrainingArguments are accepted).
--verbose (any command) also shows other libraries' INFO logs and load reports."""


def _parser(command: str):
    from transformers import HfArgumentParser, TrainingArguments

    from .arguments import DataArguments, LayerwiseArguments, ModelArguments, PeftArguments, SparseArguments

    class Parser(HfArgumentParser):
        def error(self, message):  # one line, not ~150 lines of usage before it
            print(f"sparsepeft {command}: error: {message}\n(`sparsepeft {command} --help` lists every flag)",
                  file=sys.stderr)
            raise SystemExit(2)

    parser = Parser((ModelArguments, DataArguments, SparseArguments, PeftArguments, LayerwiseArguments,
                     TrainingArguments), prog=f"sparsepeft {command}",
                    usage=f"sparsepeft {command} --output-dir DIR [--task TASK | --train-file F --validation-file F] "
                          "[--method METHOD] [flags]",
                    description="The package's own flags come first, in groups; every flag of transformers' "
                                "TrainingArguments follows (--learning-rate, --num-train-epochs, --bf16, ...). "
                                "Flags are written with - or _ alike.")
    # the package's groups first, transformers' TrainingArguments (the default group) after them
    parser._optionals.title = "transformers TrainingArguments"
    parser._action_groups = [g for g in parser._action_groups if g is not parser._optionals] + [parser._optionals]
    for action in parser._actions:
        if action.dest == "learning_rate":  # Trainer's 5e-5 is not what a run without the flag uses
            action.help = ("Peak learning rate. Default: the method family's rate (see --method), not "
                           "Trainer's %(default)s.")  # naming %(default)s keeps argparse from adding "(default: ...)"
    return parser


def _parse(argv: list[str], command: str = "train"):
    parser = _parser(command)
    if not any(a in ("--output_dir", "--output-dir") or a.startswith(("--output_dir=", "--output-dir=")) for a in argv) \
            and not any(a in ("-h", "--help") for a in argv):
        parser.error("--output-dir is required: where the model, mask and results.json are written.")
    parsed = parser.parse_args_into_dataclasses(args=argv)
    sparse_args, training_args = parsed[2], parsed[-1]
    given = any(a.startswith(("--learning-rate", "--learning_rate")) for a in argv)
    if not any(a.startswith(("--disable-tqdm", "--disable_tqdm")) for a in argv):
        training_args.disable_tqdm = False  # a progress bar with an ETA, though transformers' logs are quiet
    if not any(a.startswith(("--logging-steps", "--logging_steps")) for a in argv):
        training_args.logging_steps = 0.05  # 20 loss lines per run, whatever its length (not one per 500 steps)
    if not given:  # Trainer's 5e-5 is far too low for a 0.5% mask or an adapter: use the method family's rate
        training_args.learning_rate = sparse_args.default_learning_rate
    training_args.learning_rate_source = "given" if given else "method default"
    if not any(a.startswith(("--dataloader-pin-memory", "--dataloader_pin_memory")) for a in argv):
        import torch  # pinned memory only helps copies to an accelerator; on CPU torch warns about it

        training_args.dataloader_pin_memory = torch.cuda.is_available() or torch.backends.mps.is_available()
    return parsed


def _configure_output(verbose: bool) -> None:
    """sparsepeft's own progress at INFO; other libraries' INFO logs and transformers' load-report tables only
    with --verbose. Progress bars stay (Trainer's is how a user sees training move)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if verbose else logging.WARNING)
    logging.getLogger("sparsepeft").setLevel(logging.INFO)
    if verbose:
        return
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the LOAD REPORT table; we say in one line what is new
    for name in ("matplotlib", "huggingface_hub", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _merge(argv: list[str]) -> int:
    import argparse

    from .train import run_merge

    parser = argparse.ArgumentParser(prog="sparsepeft merge", description="Apply a sparse delta to its base model.")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="the base model")
    parser.add_argument("--delta", required=True, help="sparse_delta.safetensors written by `train --engine sparse`")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    try:
        out = run_merge(args.model, args.delta, args.output_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"sparsepeft merge: error: {error}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


def _export_shira(argv: list[str]) -> int:
    import argparse

    from .train import run_export_shira

    parser = argparse.ArgumentParser(prog="sparsepeft export-shira", description="Write a sparse delta whose entries "
                                     "all lie in nn.Linear weights as a PEFT SHiRA adapter.")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2", help="the base model")
    parser.add_argument("--delta", required=True, help="sparse_delta.safetensors written by `train --engine sparse`")
    parser.add_argument("--output-dir", required=True, help="a new (or empty) folder for the adapter")
    args = parser.parse_args(argv)
    try:
        report = run_export_shira(args.model, args.delta, args.output_dir)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"sparsepeft export-shira: error: {error}", file=sys.stderr)
        return 2
    print(f"SHiRA adapter (r={report['r']}, {report['layers']} layers, {report['trained_entries']} trained entries + "
          f"{report['padding_entries']} zero padding) written to {args.output_dir}")
    return 0


def _demo(argv: list[str]) -> int:
    import argparse

    from .demo import run_demo

    parser = argparse.ArgumentParser(prog="sparsepeft demo", description="FISH Mask (0.5% of the weights, sparse "
                                     "engine) against full fine-tuning of the packaged MiniLM on the packaged "
                                     "sentiment set: offline, a few minutes on 2 CPU cores.")
    parser.add_argument("--output-dir", default="sparsepeft-demo", help="where both runs are written")
    run_demo(parser.parse_args(argv).output_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], [a for a in argv[1:] if a != "--verbose"]
    _configure_output(verbose="--verbose" in argv)
    if command == "demo":
        return _demo(rest)
    if command == "merge":
        return _merge(rest)
    if command == "export-shira":
        return _export_shira(rest)
    if command not in ("train", "mask"):
        print(f"sparsepeft: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from .train import run_mask, run_train

    try:
        model_args, data_args, sparse_args, peft_args, layer_args, training_args = _parse(rest, command)
        if command == "train":
            result = run_train(model_args, data_args, sparse_args, training_args, peft_args, layer_args)
        else:
            if layer_args.layers is not None:
                raise ValueError("--layers chooses blocks while training: use it with `sparsepeft train`.")
            result = run_mask(model_args, data_args, sparse_args, training_args, peft_args)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"sparsepeft {command}: error: {error}", file=sys.stderr)
        return 2
    if command == "train" and training_args.process_index == 0:
        print(f"results: {result['metrics']}  ->  {training_args.output_dir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
