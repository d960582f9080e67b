"""Tokenizers from local files, and small byte-level BPE tokenizers trained on a corpus (the
CPU demo and the tests use those; real runs load the models' own tokenizer.json)."""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .prompts import ARK_SPECIAL_TOKENS, QWEN3_ASR_SPECIAL_TOKENS, QWEN_SPECIAL_TOKENS

ALL_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + ARK_SPECIAL_TOKENS + QWEN3_ASR_SPECIAL_TOKENS


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizer.json` file, or a folder holding one."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(file)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512,
                        special_tokens: tuple[str, ...] = ALL_SPECIAL_TOKENS) -> Tokenizer:
    """Byte-level BPE (Qwen's kind) with the given special tokens first in the vocabulary.

    CJK characters are pre-tokenized one by one: trained on a small closed-domain corpus,
    BPE would otherwise merge whole Mandarin phrases (which have no spaces) into single tokens,
    and a held-out sentence would be spelt in pieces never seen in training. Qwen's own
    vocabulary has the common characters as tokens of their own."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\u3400-\u4dbf\u4e00-\u9fff]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok
