"""Record (or check) the first 20 training losses of each offline preset, and the final metrics
of a short OSFT run under hardware=fsdp_sim, on small stand-ins for the built bases (a fresh
tiny model for the arithmetic presets, a fresh small word-level one for the backdoor presets).

    PYTHONPATH=src python tests/golden/record.py OUT.json   # record into OUT.json
    PYTHONPATH=src python tests/golden/record.py --compare A.json B.json

The fsdp_sim run goes in a process of its own (`--fsdp OUT.json`): Lightning starts the second
rank by running the same command line again.
"""

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from omegaconf import open_dict  # noqa: E402

from osftkit.train import run  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

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


def record(out: Path) -> None:
    """Each preset's losses, then the fsdp_sim run's final metrics, written as they come."""
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in PRESETS.items():
            results[name] = losses_of([f"experiment={name}", *overrides], Path(tmp) / name)
            out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            print(name, results[name][:3], flush=True)
    fsdp = out.with_suffix(".fsdp.json")
    subprocess.run([sys.executable, __file__, "--fsdp", str(fsdp)], check=True)
    results["fsdp_sim_osft"] = json.loads(fsdp.read_text())
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def record_fsdp(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        final = run(compose_config(FSDP, Path(tmp) / "fsdp"))
    if not out.exists():  # rank 0 writes first; the second rank's copy is the same run
        out.write_text(json.dumps(final, indent=1, sort_keys=True) + "\n")


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
    if sys.argv[1] == "--fsdp":
        record_fsdp(Path(sys.argv[2]))
    elif sys.argv[1] == "--compare":
        got, want = (json.loads(Path(p).read_text()) for p in sys.argv[2:4])
        differences = compare(got, want)
        print("\n".join(differences) or "all equal")
        sys.exit(1 if differences else 0)
    else:
        record(Path(sys.argv[1]))
