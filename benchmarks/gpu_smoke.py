"""GPU smoke test of `hardware=gpu` at real scale (prints figures; asserts nothing; ~5 minutes).

    .venv/bin/python benchmarks/gpu_smoke.py [--prompts 64] [--response 1024] [overrides ...]

Extra Hydra overrides go to both runs (e.g. the micro-batch knobs of the step-memory issue: a
64 x 1,056-token batch with a 151,936-word vocabulary has 41 GB of fp32 logits in one forward).

A Qwen2.5-Math-1.5B-shaped model built from its config with random weights (no download), saved
with save_pretrained and loaded by the kit as `model=qwen model.path=<dir>` (fp32 master weights,
bf16 autocast), then through train.py's own builders:
1. one OSFT step at `--prompts` prompts x `--response` response tokens: step time, rollout tokens/s,
   peak GPU memory;
2. the fp32-master check: one more step at lr 1e-7, the share of weights that changed (fp32
   masters) and the share that a bf16 copy of the weights would show as changed.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForCausalLM, Qwen2Config

from osftkit.models.tiny import build_byte_tokenizer
from osftkit.train import build_components, build_trainer, compose_train_config

# Qwen/Qwen2.5-Math-1.5B's config.json (architecture only).
QWEN_MATH_1P5B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


class StepProbe(Callback):
    """Wall time of each training step and of its rollout, and the tokens it generated."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        synchronize()
        self.start, self.tokens = time.perf_counter(), int(module.tokens_generated)
        rollout = module.rollout

        def timed(batch: dict):
            begin = time.perf_counter()
            rollouts = rollout(batch)
            synchronize()
            self.rollout_s = time.perf_counter() - begin
            return rollouts

        module.rollout = timed

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        synchronize()
        del module.rollout  # back to the class's method
        tokens = int(module.tokens_generated) - self.tokens
        self.steps.append(
            {
                "step_s": time.perf_counter() - self.start,
                "rollout_s": self.rollout_s,
                "rollout_tokens": tokens,
                "rollout_tokens_per_s": tokens / self.rollout_s,
            }
        )


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(directory: Path, layers: int) -> None:
    """Random weights in the shape of Qwen2.5-Math-1.5B, with the kit's byte-level tokenizer."""
    torch.manual_seed(0)
    config = Qwen2Config(**{**QWEN_MATH_1P5B, "num_hidden_layers": layers})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    build_byte_tokenizer().save_pretrained(directory)


def run_steps(
    directory: Path, hardware: str, prompts: int, response: int, lr: float, extra: list[str]
) -> tuple:
    overrides = [
        "model=qwen", f"model.path={directory}", f"hardware={hardware}", "method=osft",
        "logger=none", "callbacks=none", f"data.batch_size={prompts}",
        f"data.max_response_length={response}",
        "data.train.size=1024", f"method.optimizer.lr={lr}", "method.scheduler=null",
        "trainer.max_steps=1", "validate_before_fit=false", "validate_after_fit=false",
        "+trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false",
        f"paths.output_dir={directory.parent / 'run'}", *extra,
    ]  # fmt: skip
    cfg = compose_train_config(overrides)
    loaded, datamodule, module = build_components(cfg)
    # Random weights rarely emit EOS: every response runs to `response` tokens.
    start = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    probe = StepProbe()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    build_trainer(cfg, [probe], []).fit(module, datamodule)
    return module, start, probe


def changed_shares(module, start: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of weights the steps moved: in fp32 (the masters), and as a bf16 copy sees it."""
    total = fp32 = bf16 = 0
    for name, p in module.model.named_parameters():
        before, after = start[name], p.detach()
        total += before.numel()
        fp32 += int((after != before).sum())
        bf16 += int((after.bfloat16() != before.bfloat16()).sum())
    return {"fp32_changed": fp32 / total, "bf16_view_changed": bf16 / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--response", type=int, default=1024)
    parser.add_argument("--hardware", default="gpu", help="cpu: a check of the script itself")
    parser.add_argument("--layers", type=int, default=QWEN_MATH_1P5B["num_hidden_layers"])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "qwen_math_1p5b_random"
        build_model(directory, args.layers)
        module, _, probe = run_steps(
            directory, args.hardware, args.prompts, args.response, 3e-5, args.overrides
        )
        figures = {
            "device": torch.cuda.get_device_name() if gpu else "cpu",
            "weights_dtype": str(next(module.model.parameters()).dtype),
            **probe.steps[0],
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        }
        del module
        module, start, _ = run_steps(directory, args.hardware, 8, 64, 1e-7, args.overrides)
        figures.update({f"lr1e-7_{k}": v for k, v in changed_shares(module, start).items()})
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
