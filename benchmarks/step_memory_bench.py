"""Memory and time of one OSFT training step: the old full-vocabulary log-softmax against the one
log-prob path, and a padded against a micro-batched, trimmed step (prints figures; asserts nothing).

    .venv/bin/python benchmarks/step_memory_bench.py

A Qwen2-layout model with the real Qwen2.5 vocabulary (151,936), hidden 256, 2 layers, random
init, fp32, one thread. Each variant runs in its own process: one warm-up step (so AdamW's state
exists), then the peak RSS is reset (/proc/self/clear_refs) and one measured step runs.

1. 2 x 1,024-token rows, 512 of them response: peak above the pre-step RSS and time (wall, and
   CPU time of the process, which other processes on a shared machine do not inflate) of the old
   path (full logits, float copy, log_softmax, exp for the entropy) vs `token_logprobs`, and each
   peak as a multiple of one (batch, tokens, vocab) fp32 tensor. Target: new <= 0.25 x old.
2. 8 rows, prompts of 512 tokens, responses uniform in 16..1,024: real tokens per second of the
   whole padded batch in one forward vs micro-batches under a token budget, each trimmed.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from osftkit.methods import OSFTModule
from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.optimisation import weighted
from osftkit.models.logprobs import position_ids_from_mask
from osftkit.plan import plain_gradient_step
from osftkit.recipes import OSFTRecipe

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, LAYERS = 151_936, 256, 2
ROWS, TOKENS, RESPONSE = 2, 1024, 512
VARIABLE_ROWS, VARIABLE_PROMPT, BUDGET = 8, 512, 4096
VARIANTS = ("old", "new", "padded", "micro")


def build_model() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=4 * HIDDEN,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).train()


def fixed_batch() -> TokenBatch:
    """2 x 1,024 tokens, the last 512 of each the response."""
    ids = torch.randint(0, VOCAB, (ROWS, TOKENS), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    score = torch.zeros_like(ids)
    score[:, TOKENS - RESPONSE :] = 1
    return TokenBatch(ids, mask, score[:, 1:].bool())


def variable_batch() -> TokenBatch:
    """Full prompts, responses uniform in 16..1,024, right-padded to the longest."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 1025, (VARIABLE_ROWS,), generator=gen)
    width = VARIABLE_PROMPT + int(lengths.max())
    ids = torch.randint(0, VOCAB, (VARIABLE_ROWS, width), generator=gen)
    columns = torch.arange(width)
    mask = (columns < VARIABLE_PROMPT + lengths[:, None]).long()
    score = mask * (columns >= VARIABLE_PROMPT)
    return TokenBatch(ids * mask, mask, score[:, 1:].bool())


def old_logprobs(model, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The path this kit had before: logits of every position, float copy, log_softmax, exp."""
    mask = batch.attention_mask
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
    ).logits[:, :-1]
    log_probs = F.log_softmax(logits.float() / 1.0, dim=-1)
    chosen = log_probs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return chosen, entropy.detach()


def osft_module(model, **knobs) -> tuple[OSFTModule, torch.optim.Optimizer]:
    """The real OSFT loss path (gradient step -> minibatch_loss -> token_logprobs) and a plain
    AdamW to step it with, since no Trainer runs."""
    recipe = OSFTRecipe(group_size=1, tau_sample=0.6, max_new_tokens=RESPONSE, **knobs)
    return OSFTModule(model, None, recipe), torch.optim.AdamW(model.parameters(), lr=1e-5)


def kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def run_variant(variant: str) -> dict[str, float]:
    """One warm-up and one measured step of `variant` in this process."""
    torch.set_num_threads(1)
    model = build_model()
    if variant == "old":
        batch = fixed_batch()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def one_step() -> float:  # as plain_gradient_step: gradients freed after the step
            logp, entropy = old_logprobs(model, batch)
            mask = batch.score_mask.float()
            loss = -(logp * mask).sum() / mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss)
    else:
        batch = fixed_batch() if variant == "new" else variable_batch()
        knobs = {"max_tokens_per_micro_batch": BUDGET} if variant == "micro" else {}
        module, optimizer = osft_module(model, **knobs)

        def one_step() -> float:
            tokens = TokenBatch(batch.input_ids, batch.attention_mask, batch.score_mask)
            minibatch = weighted(tokens, "token-mean", RESPONSE)
            return float(
                plain_gradient_step(module, optimizer, minibatch, module.minibatch_loss)["loss"]
            )

    warm_loss = one_step()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = one_step()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {
        "peak_mb": (kib("VmHWM") - before) / 1024,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "first_loss": warm_loss,
        "loss": loss,
        "tokens": int(batch.attention_mask.sum()),
    }


def in_subprocess(variant: str) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--variant", variant],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant)))
        return
    runs = {variant: in_subprocess(variant) for variant in VARIANTS}
    full_tensor_mb = ROWS * TOKENS * VOCAB * 4 / 2**20
    old, new, padded, micro = (runs[v] for v in VARIANTS)
    figures = {
        "full_logits_fp32_mb": full_tensor_mb,
        "old_peak_mb": old["peak_mb"],
        "new_peak_mb": new["peak_mb"],
        "old_peak_x_full_tensor": old["peak_mb"] / full_tensor_mb,
        "new_peak_x_full_tensor": new["peak_mb"] / full_tensor_mb,
        "new_over_old_peak": new["peak_mb"] / old["peak_mb"],
        "old_step_s": old["seconds"],
        "new_step_s": new["seconds"],
        "new_over_old_time": new["seconds"] / old["seconds"],
        "old_step_cpu_s": old["cpu_seconds"],
        "new_step_cpu_s": new["cpu_seconds"],
        "new_over_old_cpu_time": new["cpu_seconds"] / old["cpu_seconds"],
        "old_first_loss": old["first_loss"],
        "new_first_loss": new["first_loss"],
        "loss_abs_difference": abs(old["first_loss"] - new["first_loss"]),
        "padded_tokens_per_s": padded["tokens"] / padded["seconds"],
        "micro_tokens_per_s": micro["tokens"] / micro["seconds"],
        "micro_over_padded_throughput": padded["seconds"] / micro["seconds"],
        "micro_over_padded_cpu_throughput": padded["cpu_seconds"] / micro["cpu_seconds"],
        "padded_peak_mb": padded["peak_mb"],
        "micro_peak_mb": micro["peak_mb"],
    }
    print(json.dumps({k: round(v, 6) for k, v in figures.items()}, indent=1))


if __name__ == "__main__":
    main()
