"""The tiny offline model: a Qwen2-architecture causal LM and a byte-level Qwen2 tokenizer.

The tokenizer is a real `Qwen2Tokenizer` whose vocabulary is the 256 byte symbols and which
has no merges: one token per ASCII character. Both are written with `save_pretrained`, so the
kit loads them with the same `from_pretrained` code path that loads Qwen or Llama weights.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

PAD, EOS = "<|pad|>", "<|endoftext|>"


@dataclass(frozen=True)
class TinyQwen2Spec:
    """Size of the tiny model; every field changes the weights, so all enter the cache key."""

    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    init_seed: int = 0

    def cache_name(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()
        return f"tiny-qwen2-bytes-{digest[:10]}"


def build_byte_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's byte-level tokenizer with no merges: pad, EOS, then the 256 byte symbols."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([PAD, EOS, *alphabet])}
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token=EOS, pad_token=PAD)


def build_tiny_model(spec: TinyQwen2Spec, vocab_size: int, tokenizer) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(spec.init_seed)
        return Qwen2ForCausalLM(config)


def save_tiny(spec: TinyQwen2Spec, directory: Path) -> None:
    """Build the tiny model and tokenizer and save both as one HF directory."""
    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(spec, len(tokenizer), tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
