"""Tiny random-initialised models of each family the library supports, and token data for them."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")

VOCAB = 64
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GLUE_DIR = Path(os.environ.get("SPARSEPEFT_GLUE_DIR", SHARED / "data" / "glue"))


def _small(**extra):
    return dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, **extra)


def make_model(family: str, num_labels: int = 2, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A tiny model of ``family``: bert, roberta, gpt2, gpt2-lm, llama, llama-lm."""
    torch.manual_seed(seed)
    bert_like = dict(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32)
    llama_like = dict(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=32)
    gpt2_like = dict(n_embd=16, n_layer=layers, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(**_small(**bert_like), num_labels=num_labels))
    elif family == "roberta":
        config = RobertaConfig(**_small(**bert_like), num_labels=num_labels)
        config.max_position_embeddings = 72  # RoBERTa offsets positions by pad_token_id + 1
        model = RobertaForSequenceClassification(config)
    elif family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, pad_token_id=0, num_labels=num_labels, **gpt2_like)
        model = GPT2ForSequenceClassification(config)
    elif family == "gpt2-lm":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, pad_token_id=0, **gpt2_like))
    elif family == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(**_small(**llama_like), num_labels=num_labels))
    elif family == "llama-lm":
        model = LlamaForCausalLM(LlamaConfig(**_small(**llama_like)))
    else:
        raise ValueError(family)
    return model


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off in every module, so that two forward passes compute the same function."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def make_examples(n: int, num_labels: int = 2, lengths=(3, 12), seed: int = 1, regression: bool = False, lm: bool = False):
    """Examples of varied length, so batches are padded."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1], (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        example = {"input_ids": ids, "attention_mask": [1] * length}
        if lm:
            example["labels"] = list(ids)
        elif regression:
            example["labels"] = round(float(torch.rand(1, generator=g)) * 40) / 8  # exact in float32
        else:
            example["labels"] = int(torch.randint(0, num_labels, (1,), generator=g))
        examples.append(example)
    return examples


@pytest.fixture
def glue_dir() -> Path:
    if not GLUE_DIR.is_dir():
        pytest.skip(f"GLUE data not found at {GLUE_DIR}: these tests read the shared GLUE files "
                    "(set SPARSEPEFT_GLUE_DIR to a GLUE folder to run them).")
    return GLUE_DIR


WORDS = ("the a is not but and very good bad great terrible product it was i of to in this that movie film "
         "never really quite awful lovely price sound battery fine poor man woman plane dog cat playing").split()


def _save_tiny(folder: Path, model_class, config_class, **config) -> Path:
    """A tiny random model and a WordPiece tokenizer saved like a hub checkpoint, for CLI tests."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz.,';",
             *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}, eos_token="[SEP]")
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=len(vocab), max_position_embeddings=128, pad_token_id=0, **config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny 2-block BERT classifier."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert"), BertForSequenceClassification, BertConfig, hidden_size=16,
                      num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)


@pytest.fixture(scope="session")
def tiny_bert4_dir(tmp_path_factory) -> Path:
    """A tiny 4-block BERT classifier (IST needs enough blocks for 3 distinct probes)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-bert4"), BertForSequenceClassification, BertConfig, hidden_size=16,
                      num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)


@pytest.fixture(scope="session")
def tiny_llama_lm_dir(tmp_path_factory) -> Path:
    """A tiny 4-block LLaMA causal LM."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), LlamaForCausalLM, LlamaConfig, hidden_size=16,
                      num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                      bos_token_id=2, eos_token_id=3)


def random_score_mask(model, ratio: float = 0.05, seed: int = 0):
    """A mask from random scores: the same global top-k machinery as FISH, without a Fisher pass."""
    from sparsepeft import select_mask

    g = torch.Generator().manual_seed(seed)
    return select_mask({n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}, ratio, model=model)


def gradient_support(model, batches) -> dict:
    """Entries of each parameter that get a non-zero gradient on some batch (on a copy: ``model`` is untouched)."""
    import copy

    probe = copy.deepcopy(model).eval()
    support = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in probe.named_parameters()}
    for batch in batches:
        probe.zero_grad()
        probe(**batch).loss.backward()
        for name, param in probe.named_parameters():
            if param.grad is not None:
                support[name] |= param.grad != 0
    return support


def assert_only_mask_moved(before: dict, model, mask, min_moved_fraction: float = 0.0, must_move: dict | None = None):
    """Entries outside the mask are bit-identical to ``before``; every kept entry in ``must_move`` (those with a
    non-zero gradient, see :func:`gradient_support`) moved, and more than the given share of kept ones did."""
    moved = 0
    for name, param in model.named_parameters():
        keep = mask.dense(name)
        assert torch.equal(param.detach()[~keep], before[name][~keep]), f"frozen entries of {name} moved"
        changed = param.detach() != before[name]
        moved += int(changed[keep].sum())
        if must_move is not None:
            stuck = keep & must_move[name] & ~changed
            assert not stuck.any(), f"{int(stuck.sum())} kept entries of {name} had a gradient but did not move"
    assert moved > min_moved_fraction * mask.num_selected
