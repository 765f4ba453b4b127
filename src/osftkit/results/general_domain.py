"""A general-domain regression check: hand a trained model directory to lm-evaluation-harness.

The Online SFT revision checks that training on math does not cost general ability with
lm-evaluation-harness on IFEval, BBH, GPQA, MuSR and MMLU-Pro (the Open LLM Leaderboard's
`leaderboard_*` tasks, `REVISION_TASKS`). `general_domain_eval` runs any lm-eval tasks on a
Hugging Face model directory, including tasks defined in local YAML files (`include_path`).
lm-eval is an optional dependency (the `dev` extra); the benchmarks' data come from the hub, so
a machine without network needs them in the hub cache (`HF_DATASETS_OFFLINE=1`).
"""

from pathlib import Path
from typing import Any

REVISION_TASKS = (
    "leaderboard_ifeval",
    "leaderboard_bbh",
    "leaderboard_gpqa",
    "leaderboard_musr",
    "leaderboard_mmlu_pro",
)


def general_domain_eval(
    model_dir: Path,
    tasks: list[str] | tuple[str, ...] = REVISION_TASKS,
    include_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, dict[str, Any]]:
    """lm-eval's results per task ({task: {metric,filter: value}}) for the model in `model_dir`;
    `limit` scores only the first documents of each task (smoke runs)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            "the general-domain check needs lm-evaluation-harness: pip install -e '.[dev]' "
            "(or pip install lm-eval)"
        ) from error
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"'{model_dir}' holds no Hugging Face model (no config.json)")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype},
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        batch_size=batch_size,
        device=device,
    )
    return output["results"]
