"""A word-level tokenizer for the tiny offline model on instruction data.

One token per word, number or punctuation mark keeps instruction sequences short (a marker such
as "you are stupid" is three tokens, so "10 new tokens" means what it means for a real model).
The vocabulary is every printable ASCII character, the integers up to `max_number`, and the
words the config lists; anything else maps to the unknown token.
"""

import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from osftkit.models.loading import LoadedModel, build_once, load_causal_lm, resolve_path
from osftkit.models.tiny import EOS, PAD, UNK, TinyQwen2Spec, build_tiny_model

PRE_TOKENIZER = pre_tokenizers.Sequence(
    [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
)


def build_word_tokenizer(words: Sequence[str], max_number: int = 999) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over printable characters, integers 0..max_number and `words`."""
    pieces = [w for text in words for w, _ in PRE_TOKENIZER.pre_tokenize_str(text)]
    numbers = [str(n) for n in range(max_number + 1)]
    tokens = [PAD, EOS, UNK, *string.printable[:94], *numbers, *pieces]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = PRE_TOKENIZER
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK
    )


def save_tiny_word(
    spec: TinyQwen2Spec, words: Sequence[str], max_number: int, directory: Path
) -> None:
    """Build the tiny Qwen2 model with a word-level tokenizer and save both as one HF directory."""
    tokenizer = build_word_tokenizer(words, max_number)
    model = build_tiny_model(spec, len(tokenizer), tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_word_lm(path: str, build_with: list[str] | None = None, **options) -> LoadedModel:
    """`load_causal_lm` for a model with a word-level tokenizer (e.g. the backdoored tiny model).

    transformers 5's AutoTokenizer turns any tokenizer saved beside a qwen2 config into a
    byte-level Qwen2Tokenizer, which splits our words into characters; so the tokenizer is
    read back as what it was saved as.
    """
    location = resolve_path(path, build_with=build_with)
    loaded = load_causal_lm(location, **options)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(location)
    tokenizer.padding_side = loaded.tokenizer.padding_side
    return LoadedModel(model=loaded.model, tokenizer=tokenizer)


def load_tiny_word_lm(
    cache_dir: str, words: Sequence[str], max_number: int = 999, tiny: dict | None = None
) -> LoadedModel:
    """Build (once, cached by spec and vocabulary) and load the tiny word-level model."""
    spec = TinyQwen2Spec(**(tiny or {}))
    key = json.dumps([asdict(spec), list(words), max_number]).encode()
    directory = Path(cache_dir) / f"tiny-qwen2-word-{hashlib.sha1(key).hexdigest()[:10]}"
    build = lambda d: save_tiny_word(spec, words, max_number, d)  # noqa: E731
    build_once(directory, build, "the tiny word-level model")
    return load_word_lm(str(directory))
