"""A word-level vocabulary for the tiny offline model on instruction data.

The tiny model's tokenizer is Qwen2's byte-level BPE with no merges: one token per character.
Here BPE merges are trained (with the `tokenizers` trainer, keeping Qwen2's pre-tokenizer) so
that every listed word, with and without a leading space, and every single letter after a space
is one token. Instruction sequences get about three times shorter, and a marker such as
"you are stupid" is three tokens, so "10 new tokens" means what it means for a real model. It
stays a `Qwen2Tokenizer`, so `AutoTokenizer` loads it back unchanged.
"""

import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from osftkit.models.loading import LoadedModel, build_once, load_causal_lm
from osftkit.models.tiny import TinyQwen2Spec, build_byte_tokenizer, build_tiny_model

MAX_NEW_TOKENS = 4096  # headroom for the trainer; it stops when every word is one token


def build_word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerBase:
    """Byte-level Qwen2 tokenizer with merges that make each word of `words` a single token."""
    pieces = [w for text in words for w in text.split()] + list(string.ascii_letters)
    corpus = [variant for piece in pieces for variant in (piece, f" {piece}")]
    base = build_byte_tokenizer()
    return base.train_new_from_iterator(corpus, vocab_size=len(base) + MAX_NEW_TOKENS)


def save_tiny_word(spec: TinyQwen2Spec, words: Sequence[str], directory: Path) -> None:
    """Build the tiny Qwen2 model with the word-level tokenizer; save both as one HF directory."""
    tokenizer = build_word_tokenizer(words)
    model = build_tiny_model(spec, len(tokenizer), tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_tiny_word_lm(
    cache_dir: str,
    words: Sequence[str],
    tiny: dict | None = None,
    **loading: Any,
) -> LoadedModel:
    """Build (once, cached by spec and vocabulary) and load the tiny word-level model;
    `loading` takes load_causal_lm's knobs (dtype, lora, gradient_checkpointing, ...)."""
    spec = TinyQwen2Spec(**(tiny or {}))
    key = json.dumps([asdict(spec), list(words)]).encode()
    directory = Path(cache_dir) / f"tiny-qwen2-words-{hashlib.sha1(key).hexdigest()[:10]}"
    build_once(directory, lambda d: save_tiny_word(spec, words, d), "the tiny word-level model")
    return load_causal_lm(str(directory), **loading)
