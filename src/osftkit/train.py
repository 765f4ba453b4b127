"""run(cfg): build missing bases -> seed -> model -> data -> method -> callbacks -> loggers ->
Trainer -> fit -> report."""

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table

from osftkit.checkpointing import AtomicCheckpointIO
from osftkit.console import configure_console
from osftkit.data import DataLoadError
from osftkit.hardware import (
    MIXED_PRECISION,
    FSDP2Strategy,
    choose_accelerator,
    configure_threads,
    consolidated_state_dict,
    cpu_processes,
    fsdp_units,
)
from osftkit.interpret.trigger_discovery import discover_removal_triggers
from osftkit.methods.inputs import RunInputs
from osftkit.models import LoadedModel
from osftkit.models.loading import ModelNotFoundError, build_once, resolve_path
from osftkit.run_logger import close_run_loggers, log_final_hparams

log = logging.getLogger(__name__)
# Step checkpoints of manual-optimisation modules hold the weights after the step, which is
# what resuming needs; Lightning warns about it on every save.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CLEAR_ERRORS = (ModelNotFoundError, DataLoadError, ValueError, FileNotFoundError)
LOAD_CAUSAL_LM = "osftkit.models.load_causal_lm"
TRAINER_HARDWARE_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision")
# The Trainer's numbers, checked before anything is built (Lightning fails deep inside on a string).
TRAINER_NUMBERS = (
    "max_steps",
    "min_steps",
    "max_epochs",
    "val_check_interval",
    "check_val_every_n_epoch",
    "log_every_n_steps",
    "num_sanity_val_steps",
    "limit_train_batches",
    "limit_val_batches",
    "accumulate_grad_batches",
)


def check_trainer_numbers(trainer: DictConfig) -> None:
    """Each `trainer.<knob>` of TRAINER_NUMBERS that is set must be a number."""
    for key in TRAINER_NUMBERS:
        value = trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"trainer.{key} must be a number, got {value!r}")


def resolve_hardware(cfg: DictConfig) -> None:
    """Check the trainer's numbers and settle `hardware.accelerator` (auto -> gpu | cpu) once,
    before a base is built or a model loaded."""
    check_trainer_numbers(cfg.trainer)
    with open_dict(cfg):
        requested = cfg.hardware.get("accelerator", "cpu")
        cfg.hardware.accelerator = choose_accelerator(requested)
        if requested == "auto" and cfg.hardware.accelerator == "cpu":
            cfg.hardware.update(cpu_processes(cfg.hardware.get("cpu_processes", 1)))
        cfg.hardware.pop("cpu_processes", None)  # settled: a second call changes nothing


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list[Logger]) -> L.Trainer:
    resolve_hardware(cfg)
    hardware = {key: cfg.hardware[key] for key in TRAINER_HARDWARE_KEYS if key in cfg.hardware}
    if isinstance(hardware.get("strategy"), DictConfig):
        hardware["strategy"] = instantiate(hardware["strategy"])
    hardware.setdefault("precision", trainer_precision(cfg, hardware.get("strategy")))
    return L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        **hardware,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=cfg.paths.output_dir,
        plugins=[AtomicCheckpointIO()],
    )


def trainer_precision(cfg: DictConfig, strategy: Any) -> str:
    """Compute in `model.dtype` over the fp32 weights train.py loads: autocast, or under FSDP2
    its own mixed-precision policy (the Trainer then keeps everything fp32)."""
    compute = cfg.model.get("dtype", "float32")
    if isinstance(strategy, FSDP2Strategy) or compute not in MIXED_PRECISION:
        return "32-true"  # an unknown dtype is reported by the model loader, naming the knob
    return MIXED_PRECISION[compute]


def instantiate_group(group: DictConfig | None, **handed: Any) -> list:
    """Named entries (`callbacks`, `logger`) -> objects; an entry set to null is dropped; an
    entry with a key of `handed` (e.g. `data`) is handed that object."""
    return [
        instantiate(entry, **{k: v for k, v in handed.items() if k in entry})
        for entry in (group or {}).values()
        if entry
    ]


@contextmanager
def clear_errors() -> Iterator[None]:
    """Show the kit's own error message rather than Hydra's wrapper around it."""
    try:
        yield
    except InstantiationException as error:
        if isinstance(error.__cause__, CLEAR_ERRORS):
            raise error.__cause__ from None
        raise


@contextmanager
def one_line_errors() -> Iterator[None]:
    """An entry point's user mistake (CLEAR_ERRORS) prints as one line and exits with status 1;
    HYDRA_FULL_ERROR=1 keeps the full traceback."""
    try:
        yield
    except CLEAR_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s: %s", type(error).__name__, error)
        raise SystemExit(1) from None


def build_components(
    cfg: DictConfig,
) -> tuple[LoadedModel, L.LightningDataModule, L.LightningModule]:
    # Training keeps fp32 master weights; `model.dtype` is the compute dtype (trainer_precision).
    master = {"dtype": "float32"} if "dtype" in cfg.model else {}
    with clear_errors():
        loaded: LoadedModel = instantiate(cfg.model, **master)
        discover_removal_triggers(cfg, loaded)
    if loaded.tokenizer is None:  # a predictor for the feature tests: handed the data's features
        datamodule = instantiate(cfg.data)
        features = {
            "feature_mask": datamodule.feature_mask,
            "token_strings": getattr(datamodule, "vocab", None),
        }
        method = instantiate(cfg.method, _convert_="all", model=loaded.model, **features)
        return loaded, datamodule, method
    datamodule = instantiate(cfg.data, tokenizer=loaded.tokenizer)
    with clear_errors():  # a bad engine or recipe value: one line, not Hydra's wrapper
        module = build_method(
            cfg.method,
            loaded,
            validation=OmegaConf.to_container(cfg.validation, resolve=True),
            engine=instantiate(cfg.engine),
            inputs=RunInputs.of(datamodule),
        )
    return loaded, datamodule, module


def build_method(method: DictConfig, loaded: LoadedModel, **run: Any) -> L.LightningModule:
    """An LM method's module from its typed recipe (`OmegaConf.to_object` builds the dataclass
    and runs its checks), handed the model, the tokenizer and `run` (validation, engine,
    inputs)."""
    recipe = OmegaConf.to_object(method)
    return get_class(recipe._target_)(loaded.model, loaded.tokenizer, recipe, **run)


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """`ckpt_path=last` (or `auto_resume=true`) means `<run dir>/checkpoints/last.ckpt`; give
    the killed run's directory with `hydra.run.dir=...` so logs and TensorBoard continue there."""
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if not last.exists() and last.with_name("last.ckpt.old").exists():
        last = last.with_name("last.ckpt.old")  # killed in the instant of a sharded swap_in
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last" and not last.exists():
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoint at {last}. Resume in the killed run's directory: "
            "python train.py hydra.run.dir=logs/<task_name>/runs/<time> ckpt_path=last"
        )
    if ckpt_path == "last" or (not ckpt_path and cfg.get("auto_resume") and last.exists()):
        log.info("Resuming from %s", last)
        return str(last)
    return ckpt_path


def build_missing_base(model: DictConfig) -> None:
    """Build a kit-made model that is missing (tiny init, `build_with` training) BEFORE seeding:
    building draws from the global random streams, so a run that builds its base and one that
    finds it would otherwise train differently. The loader only loads: building is this job."""
    if model.get("_target_") != LOAD_CAUSAL_LM:
        return
    tiny, build_with = model.get("tiny"), model.get("build_with")
    if tiny is not None:
        resolve_path(model.get("path"), model.get("cache_dir"), dict(tiny))
    elif build_with is not None and model.get("path"):
        overrides = list(build_with)
        directory = Path(model.path)
        build = lambda d: build_by_training(overrides, d)  # noqa: E731
        build_once(directory, build, f"model '{directory.name}' ({' '.join(overrides)})")


def start_run(cfg: DictConfig) -> None:
    """The preamble of every run (training and evaluation): the console, the hardware (a GPU
    option without a GPU stops here), a missing base built BEFORE seeding, threads, the seed."""
    configure_console()
    resolve_hardware(cfg)
    build_missing_base(cfg.model)  # a build sets its own threads: this run's are set after it
    configure_threads(cfg.hardware.get("num_threads"))
    L.seed_everything(cfg.seed, workers=True)


def run(cfg: DictConfig) -> dict[str, float]:
    """Train (and evaluate before and after) as configured; returns the final metrics."""
    start_run(cfg)
    ckpt_path = resume_checkpoint(cfg)
    loaded, datamodule, module = build_components(cfg)
    loggers = instantiate_group(cfg.get("logger"))
    with clear_errors():
        callbacks = instantiate_group(cfg.get("callbacks"), data=datamodule)
    last_validation = LastValidationStep()
    trainer = build_trainer(cfg, [*callbacks, last_validation], loggers)
    if (
        cfg.get("export_dir")
        and cfg.model.get("lora")
        and isinstance(trainer.strategy, FSDP2Strategy)
    ):
        raise ValueError("export_dir with model.lora under hardware=fsdp: not supported; use ddp")
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    # A resumed run's "before" would be the checkpoint's numbers: the first launch reported it.
    validate_before = cfg.validate_before_fit and not ckpt_path
    before = validate(trainer, module, datamodule) if validate_before else {}
    trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)
    # A fit whose last step was just validated has its "after" already (each costs a full pass).
    validate_after = cfg.validate_after_fit and last_validation.step != trainer.global_step
    after = validate(trainer, module, datamodule) if validate_after else {}
    after = after or {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("export_dir"):
        export(loaded, cfg.export_dir, trainer.is_global_zero)
    final = {key: float(value) for key, value in after.items()}
    log_final_hparams(loggers, cfg, final, trainer.global_step)
    close_run_loggers(loggers)
    if trainer.is_global_zero:
        report(before, after, getattr(module, "counters", frozenset()))
    return final


def validate(trainer: L.Trainer, module: L.LightningModule, datamodule: Any) -> dict[str, float]:
    """One validation's metrics; none when there is nothing to validate (limit_val_batches=0)."""
    results = trainer.validate(module, datamodule)
    return results[0] if results else {}


class LastValidationStep(L.Callback):
    """The global step of the latest validation (sanity checks aside)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def export(loaded: LoadedModel, directory: str, writer: bool = True) -> None:
    """Save the trained model (LoRA merged) and tokenizer as an HF directory. Every rank calls it
    (a sharded model is consolidated collectively); the `writer` rank writes."""
    model = loaded.model
    weights = consolidated_state_dict(model) if fsdp_units(model) else None
    if not writer:
        return
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(directory, state_dict=weights)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)
    log.info("Saved the trained model as an HF directory: %s", directory)


def report(
    before: dict[str, Any], after: dict[str, Any], counters: frozenset[str] = frozenset()
) -> None:
    """Print validation metrics before and after training side by side (not `counters`: logged
    at validation, but counts of the training run, such as the tokens generated)."""
    keys = sorted(k for k in {*before, *after} if k.startswith("val/") and k not in counters)
    if not keys:
        return
    table = Table(title="validation: before -> after training")
    for column in ("metric", "before", "after"):
        table.add_column(column)
    for key in keys:
        cells = [f"{d[key]:.4f}" if key in d else "-" for d in (before, after)]
        table.add_row(key, *cells)
    Console().print(table)


def compose_train_config(overrides: list[str], config_name: str = "train") -> DictConfig:
    """The `train` (or `eval`) config with overrides, inside or outside a running Hydra app."""
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name=config_name, overrides=overrides)
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra.compose(config_name=config_name, overrides=overrides)


def build_by_training(overrides: list[str], directory: Path) -> None:
    """Train a model with the kit (e.g. `experiment=arith_base`) and export it to `directory`."""
    log.info("Training it with: python train.py %s", " ".join(overrides))
    os.environ.setdefault("OSFTKIT_ROOT", str(CONFIG_DIR.parent))
    cfg = compose_train_config(
        [
            *overrides,
            f"export_dir={directory}",
            f"paths.output_dir={directory.parent / (directory.name.split('.')[0] + '.build')}",
            f"paths.model_dir={directory.parent}",
            # The job that builds it validates it next (before its fit, or as its evaluation).
            "++trainer.limit_val_batches=0",
        ]
    )
    with open_dict(cfg):  # one bar over the whole build, with the time left
        cfg.callbacks = cfg.get("callbacks") or {}
        cfg.callbacks.progress_bar = {
            "_target_": "osftkit.console.StepProgressBar",
            "description": f"Building {directory.name.split('.')[0]}",
        }
    run(cfg)
