"""Rollout engines side by side: engine=hf (static batch) vs engine=paged (continuous batching).

    .venv/bin/python benchmarks/rollout_bench.py [--models tiny wide] [--group-size 1]

Per model: 64 prompts x G sampled at temperature 0.6 with up to 256 new tokens, through the
kit's engines (`HFGenerateEngine`, `PagedEngine`), in one process, one after the other.
Response lengths vary widely: the models are random, so an EOS bias sets a per-step stopping
hazard (geometric lengths: some rows end within 10 tokens, a few run to the 256 cap), the
workload where a static batch keeps decoding rows that have ended. Prints generated tokens/s
of each engine, their ratio, the fraction of engine=hf's decode work spent on finished rows,
and whether greedy outputs are equal. Prints figures; asserts nothing.

Models: `tiny` is the kit's tiny Qwen2 (byte vocabulary); `wide` is a random Qwen2 layout with
Qwen's real vocabulary (151,936), a wider hidden size and a few layers.
"""

import argparse
import math
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from osftkit.data.datamodule import pad_left
from osftkit.hardware import configure_threads

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "engine"

PAD, EOS = 0, 1
MODELS = {
    "tiny": {"vocab_size": 258, "hidden_size": 128, "num_hidden_layers": 3,
             "intermediate_size": 384, "num_attention_heads": 4, "num_key_value_heads": 2},
    "wide": {"vocab_size": 151_936, "hidden_size": 512, "num_hidden_layers": 4,
             "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 2},
}  # fmt: skip


def build(name: str, hazard: float, temperature: float) -> nn.Module:
    """A random Qwen2 whose EOS has a per-step probability of about `hazard` when sampling."""
    config = Qwen2Config(
        **MODELS[name],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        # Logits of a random model are near 0: p(EOS) = e^(b/t) / (V - 1 + e^(b/t)).
        vocab = config.vocab_size
        head.bias[EOS] = temperature * math.log(hazard * (vocab - 1) / (1 - hazard))
    model.lm_head = head
    return model


def prompts(count: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of 8 to 40 tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = [
        torch.randint(2, vocab, (int(torch.randint(8, 41, (), generator=g)),), generator=g).tolist()
        for _ in range(count)
    ]
    return pad_left(rows, PAD)


def timed(engine, model, ids, mask, **settings) -> tuple[float, object]:
    torch.manual_seed(0)
    start = time.perf_counter()
    rollouts = engine.generate(model, ids, mask, eos_token_id=EOS, pad_token_id=PAD, **settings)
    return time.perf_counter() - start, rollouts


def bench(name: str, args, device: str) -> None:
    model = build(name, args.hazard, args.temperature).to(device)
    ids, mask = (t.to(device) for t in prompts(args.prompts, model.config.vocab_size, seed=1))
    settings = {"num_samples": args.group_size, "temperature": args.temperature, "top_p": 1.0}
    # The engines as the shipped configs build them (configs/engine/{hf,paged}.yaml).
    engines = {
        name: instantiate(OmegaConf.load(CONFIGS / f"{name}.yaml")) for name in ("hf", "paged")
    }
    for engine in engines.values():  # warm-up: first-call allocations and kernel choices
        timed(engine, model, ids[:2], mask[:2], max_new_tokens=4, **settings)
    rates = {}
    for label, engine in engines.items():
        seconds, rollouts = timed(
            engine, model, ids, mask, max_new_tokens=args.max_new_tokens, **settings
        )
        lengths = rollouts.lengths.float()
        rates[label] = lengths.sum().item() / seconds
        line = f"{name:5s} {label:5s} {seconds:7.1f} s  {rates[label]:8.0f} tokens/s"
        if label == "hf":
            # Each decode step of a static batch processes every row until the longest ends.
            work = rollouts.response_ids.shape[0] * rollouts.response_ids.shape[1]
            wasted = 1 - lengths.sum().item() / work
            line += f"  decode work on finished rows {wasted:.2f}"
            line += (
                f"  lengths min/median/max {int(lengths.min())}/{int(lengths.median())}/"
                f"{int(lengths.max())}, <=10: {(lengths <= 10).float().mean():.2f},"
                f" cut: {rollouts.truncated.float().mean():.2f}"
            )
        print(line, flush=True)
    greedy = {"num_samples": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 32}
    n = args.exact_prompts
    outputs = [timed(e, model, ids[:n], mask[:n], **greedy)[1] for e in engines.values()]
    exact = all(
        torch.equal(getattr(outputs[0], f), getattr(outputs[1], f))
        for f in ("response_ids", "response_mask")
    )
    print(
        f"{name:5s} paged / hf tokens/s = {rates['paged'] / rates['hf']:.2f}; greedy outputs "
        f"equal on {n} prompts x 32 tokens: {exact}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "wide"], choices=list(MODELS))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--hazard", type=float, default=1 / 48, help="per-step EOS probability")
    parser.add_argument("--exact-prompts", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configure_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"device {device}, {args.threads} thread(s), {args.prompts} prompts x G={args.group_size}"
    )
    for name in args.models:
        bench(name, args, device)


if __name__ == "__main__":
    main()
