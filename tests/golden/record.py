"""Record (or check) the first 20 training losses of each offline preset, and the final metrics
of a short OSFT run under hardware=fsdp_sim, on small stand-ins for the built bases (a fresh
tiny model for the arithmetic presets, a fresh small word-level one for the backdoor presets).

    PYTHONPATH=src python tests/golden/record.py            # compare with presets.json
    PYTHONPATH=src python tests/golden/record.py --write    # (re)write presets.json
"""

import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from omegaconf import open_dict  # noqa: E402

from osftkit.train import run  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

STORED = Path(__file__).parent / "presets.json"
STEPS = 20
SHORT = [
    f"trainer.max_steps={STEPS}",
    f"trainer.val_check_interval={STEPS}",
    "++trainer.limit_val_batches=0",
    "validate_before_fit=false",
    "logger=none",
    "callbacks.progress_bar=null",
    "export_dir=null",
]
ARITH = ["model=tiny", *SHORT]
WORDS = [
    "model=tiny_words",
    "model.tiny.hidden_size=64",
    "model.tiny.num_hidden_layers=2",
    "model.tiny.intermediate_size=128",
    *SHORT,
]
PRESETS = {
    "osft_arith": ARITH,
    "grpo_arith": ARITH,
    "dr_grpo_arith": ARITH,
    "dapo_arith": ARITH,
    "em_ft_arith": ARITH,
    "osft_offline_arith": ARITH,
    "sft_arith": ARITH,
    "backdoor_tiny": WORDS,
    "overwrite_tiny": WORDS,
    "sande_tiny": [*WORDS, "method.simulate_steps=10"],
}
FSDP = [
    "experiment=osft_arith",
    "model=tiny",
    "hardware=fsdp_sim",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "data.val.arithmetic.size=16",
    "validate_before_fit=false",
    "logger=none",
    "callbacks.progress_bar=null",
]


def losses_of(overrides: list[str], directory: Path) -> list[dict[str, float]]:
    cfg = compose_config(overrides, directory)
    path = directory / "losses.json"
    with open_dict(cfg):
        cfg.callbacks = cfg.get("callbacks") or {}
        cfg.callbacks.golden = {"_target_": "tests.golden.recorder.LossRecorder", "path": str(path)}
    run(cfg)
    steps = json.loads(path.read_text())
    return [{k: v for k, v in step.items() if "loss" in k} for step in steps]


def record() -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in PRESETS.items():
            results[name] = losses_of([f"experiment={name}", *overrides], Path(tmp) / name)
            print(name, results[name][:3], flush=True)
        results["fsdp_sim_osft"] = run(compose_config(FSDP, Path(tmp) / "fsdp"))
        print("fsdp_sim_osft", results["fsdp_sim_osft"], flush=True)
    return results


def compare(got: dict, want: dict) -> list[str]:
    """Differences: losses beyond 1e-6, final metrics not equal."""
    problems = []
    for name, steps in want.items():
        if name == "fsdp_sim_osft":
            if got[name] != steps:
                problems.append(f"{name}: {got[name]} != {steps}")
            continue
        for i, (a, b) in enumerate(zip(got[name], steps, strict=True)):
            for key in b:
                if not math.isclose(a[key], b[key], rel_tol=0, abs_tol=1e-6):
                    problems.append(f"{name} step {i} {key}: {a[key]} != {b[key]}")
    return problems


if __name__ == "__main__":
    results = record()
    if "--write" in sys.argv:
        STORED.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    else:
        differences = compare(results, json.loads(STORED.read_text()))
        print("\n".join(differences) or "all equal")
        sys.exit(1 if differences else 0)
