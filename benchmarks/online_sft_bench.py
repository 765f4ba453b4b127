"""Cost of Online SFT against GRPO on the same prompts and model (prints figures; asserts nothing).

    .venv/bin/python benchmarks/online_sft_bench.py [--model arith_base] [--steps 5]

1. wall time of one OSFT step (G = 1) over one GRPO step (G = 8)      target <= 0.25
2. tokens/s of the in-loop rollout hook over transformers `generate`   target >= 0.95
3. peak memory (max RSS) of OSFT over GRPO with a KL reference model
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from osftkit.hardware import configure_threads
from osftkit.train import (
    build_components,
    build_missing_base,
    build_trainer,
    compose_train_config,
)

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.start)


def config(model: str, method: str, steps: int, extra: list[str], out: Path):
    """The benchmark's config; a missing kit-built base is built first (as train.py does)."""
    cfg = compose_train_config(
        [
            f"model={model}",
            f"method={method}",
            f"trainer.max_steps={steps}",
            "logger=none",
            "callbacks=none",
            "validate_before_fit=false",
            "validate_after_fit=false",
            "+trainer.limit_val_batches=0",
            f"paths.output_dir={out}",
            *extra,
        ]
    )
    build_missing_base(cfg.model)
    return cfg


def step_seconds(model: str, method: str, steps: int, extra: list[str], out: Path) -> float:
    """Median wall time of a training step (rollout + update), after one warm-up step."""
    cfg = config(model, method, steps + 1, extra, out)
    configure_threads(cfg.hardware.num_threads)
    L.seed_everything(0)
    _, datamodule, module = build_components(cfg)
    timer = StepTimer()
    build_trainer(cfg, [timer], []).fit(module, datamodule)
    return sorted(timer.times[1:])[len(timer.times[1:]) // 2]


def rollout_throughput(model: str, out: Path, repeats: int = 3) -> tuple[float, float]:
    """Tokens/s of OSFTModule.rollout and of model.generate called directly, same batch."""
    cfg = config(model, "osft", 1, [], out)
    configure_threads(cfg.hardware.num_threads)
    _, datamodule, module = build_components(cfg)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module.epoch_progress = 0.0
    settings = module.hparams

    def direct() -> int:
        with torch.no_grad():
            output = module.model.generate(
                input_ids=batch["prompt_ids"],
                attention_mask=batch["prompt_mask"],
                do_sample=True,
                temperature=settings.tau_sample,
                top_p=settings.top_p,
                top_k=None,
                max_new_tokens=settings.max_new_tokens,
                eos_token_id=module.tokenizer.eos_token_id,
                pad_token_id=module.tokenizer.pad_token_id,
            )
        generated = output[:, batch["prompt_ids"].shape[1] :]
        return int((generated != module.tokenizer.pad_token_id).sum())

    def hook() -> int:
        return int(module.rollout(batch).lengths.sum())

    rates = {}
    for name, fn in (("direct", direct), ("hook", hook)) * repeats:
        torch.manual_seed(0)
        start = time.perf_counter()
        tokens = fn()
        rates.setdefault(name, []).append(tokens / (time.perf_counter() - start))
    return max(rates["hook"]), max(rates["direct"])


def peak_rss_mb(model: str, method: str, extra: list[str]) -> float:
    """Max RSS of a fresh process that runs 3 steps (MB). A small train split keeps the
    tokenised data set from dominating the peak."""
    extra = [*extra, "data.train.size=2048"]
    code = (
        "import resource; from pathlib import Path\n"
        "from benchmarks.online_sft_bench import step_seconds\n"
        f"step_seconds({model!r}, {method!r}, 2, {extra!r}, Path('/tmp/osftkit_bench'))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OSFTKIT_ROOT": str(ROOT)},
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="arith_base")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OSFTKIT_ROOT", str(ROOT))
    out = Path("/tmp/osftkit_bench")
    # First, while this process has not trained yet: its environment passes to the children.
    rss_osft = peak_rss_mb(args.model, "osft", [])
    rss_grpo = peak_rss_mb(args.model, "grpo", ["method.kl_coef=0.01"])
    osft = step_seconds(args.model, "osft", args.steps, [], out)
    grpo = step_seconds(args.model, "grpo", args.steps, [], out)
    hook, direct = rollout_throughput(args.model, out)
    figures = {
        "osft_step_s": osft,
        "grpo_step_s": grpo,
        "osft_over_grpo_step": osft / grpo,
        "hook_tokens_per_s": hook,
        "generate_tokens_per_s": direct,
        "hook_over_generate": hook / direct,
        "osft_peak_rss_mb": rss_osft,
        "grpo_kl_peak_rss_mb": rss_grpo,
        "osft_over_grpo_kl_memory": rss_osft / rss_grpo,
    }
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=1))


if __name__ == "__main__":
    main()
