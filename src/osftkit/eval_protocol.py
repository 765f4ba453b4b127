"""eval.py's protocol pieces. SePT's choice of the base model's tau_eval: sweep it on a dev split
disjoint from the test split, pick the tau with the best AVG there, then score the base on the
test split at that tau (trained models are scored at tau_eval 1). And per-problem records of
each validation in a results store (`store=<dir>`), which another grader can re-score."""

import json
import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from osftkit.results.general_domain import general_domain_eval
from osftkit.results.outcomes import OutcomeRecorder
from osftkit.results.rescore import read_samples, rescore
from osftkit.results.store import ResultStore, config_hash
from osftkit.rewards.verify import COMPARATORS, AnswerChecker

log = logging.getLogger(__name__)
CRITERION = "val/avg"  # SePT picks the base's tau by AVG, the mean of pass@1, 8, 32


def validate_at(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    tau: float,
    split: str = "test",
) -> dict[str, float]:
    """One row of validation metrics at `tau` on `datamodule`'s validation sets (recorded in
    the store when `attach_recorder` gave the module one)."""
    for name in list(module.val_metrics):  # metrics of another data module's sets would be empty
        if name not in datamodule.val_names:
            del module.val_metrics[name]
    module.validation_settings.tau_eval = float(tau)
    recorder = getattr(module, "outcome_sink", None)
    if recorder is not None:
        recorder.reset()
    metrics = trainer.validate(module, datamodule, verbose=False)[0]
    row = {"tau_eval": float(tau), **{k: float(v) for k, v in metrics.items()}}
    if recorder is not None:
        recorder.add_record(row, split)
    return row


def attach_recorder(
    cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule
) -> OutcomeRecorder | None:
    """With `store=<dir>`, the module hands each validation batch to a recorder that writes one
    record per validation to the ResultStore there (every sample too with store_samples)."""
    if not cfg.get("store"):
        return None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    stamp = {
        "table": cfg.task_name,
        "seed": cfg.seed,
        "config_hash": config_hash(resolved),
        "base_model": str(cfg.get("ckpt_path") or cfg.model.get("path") or cfg.model._target_),
    }
    store = ResultStore(Path(cfg.store))
    module.outcome_sink = OutcomeRecorder(
        store, stamp, datamodule.checker.extract, bool(cfg.store_samples)
    )
    return module.outcome_sink


def dev_datamodule(cfg: DictConfig, test: L.LightningDataModule) -> L.LightningDataModule:
    """The test data module's settings with `cfg.dev` as its validation sets and no training."""
    if not cfg.get("tau_sweep"):
        raise ValueError("dev: the dev split chooses tau_eval, so it needs tau_sweep=[...]")
    data = cfg.data.copy()
    with open_dict(data):  # replaced, not merged: a dev set shares no keys with a test set
        data.train, data.val = None, cfg.dev
    return instantiate(data, tokenizer=test.tokenizer)


def best_tau(rows: list[dict[str, float]]) -> float:
    """The tau with the highest AVG (the lowest tau among ties: the sweep is sorted)."""
    return max(sorted(rows, key=lambda r: r["tau_eval"]), key=lambda r: r[CRITERION])["tau_eval"]


def base_tau_on_dev(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: L.LightningModule,
    test: L.LightningDataModule,
    write_results: Callable[[list[dict[str, float]], Path], object],
) -> list[dict[str, float]]:
    """Sweep tau_sweep on the dev sets (written to dev_sweep/), choose tau by AVG, score the test
    sets at it (eval.csv); base_tau.json holds the choice and both rows. Returns the test row."""
    dev = dev_datamodule(cfg, test)
    sweep = [validate_at(trainer, module, dev, tau, split="dev") for tau in cfg.tau_sweep]
    out = Path(cfg.paths.output_dir)
    write_results(sweep, out / "dev_sweep")
    tau = best_tau(sweep)
    row = validate_at(trainer, module, test, tau)
    write_results([row], out)
    chosen = {
        "tau_eval": tau,
        "criterion": CRITERION,
        "dev": next(r for r in sweep if r["tau_eval"] == tau),
        "test": row,
        "dev_sets": list(dev.val_names),
        "test_sets": list(test.val_names),
    }
    (out / "base_tau.json").write_text(json.dumps(chosen, indent=2) + "\n")
    log.info("Base tau_eval %.2f chosen on dev by %s; test %s", tau, CRITERION, row[CRITERION])
    return [row]


def check_after_eval(cfg: DictConfig) -> None:
    """One clear message, before any validation, for an after-eval option that cannot run."""
    if cfg.get("rescore_with") and not (cfg.get("store") and cfg.get("store_samples")):
        raise ValueError(
            "rescore_with re-scores stored samples: set store=<dir> store_samples=true"
        )
    if cfg.get("rescore_with") and cfg.rescore_with not in COMPARATORS:
        raise ValueError(
            f"rescore_with must be one of {sorted(COMPARATORS)}, got '{cfg.rescore_with}'"
        )
    if cfg.get("general_domain"):
        if cfg.get("ckpt_path") or not cfg.model.get("path"):
            raise ValueError(
                "general_domain hands lm-eval a model directory (model.path); export a "
                "checkpoint first (train.py export_dir=...)"
            )
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ValueError(
                "general_domain needs lm-evaluation-harness, which is not installed: "
                "pip install lm-eval (or the kit's dev extra)"
            ) from None


def after_eval(cfg: DictConfig, recorder: OutcomeRecorder | None, checker: AnswerChecker) -> None:
    """rescore_with: this run's stored samples re-scored by that grader (rescore.json);
    general_domain: lm-eval's tasks on the model directory (general_domain.json)."""
    out = Path(cfg.paths.output_dir)
    if cfg.get("rescore_with") and recorder is not None:
        second = AnswerChecker(extract=checker.settings[0], compare=cfg.rescore_with)
        report = {}
        for record in recorder.written:
            result = rescore(read_samples(recorder.store.directory / record["samples"]), second)
            log.info("%s: %s", record["arm"], result.summary(cfg.rescore_with))
            report[record["arm"]] = {
                "first": checker.settings[1],
                "second": cfg.rescore_with,
                "samples": result.total,
                "agree": result.agree,
                "rate": result.rate,
                "only_first": result.only_first,
                "only_second": result.only_second,
            }
        (out / "rescore.json").write_text(json.dumps(report, indent=2) + "\n")
    if cfg.get("general_domain"):
        settings = OmegaConf.to_container(cfg.general_domain, resolve=True)
        try:
            results = general_domain_eval(Path(cfg.model.path), **settings)
        except ImportError as error:  # a task's own dependency (IFEval needs langdetect, ...)
            message = f"general_domain: an lm-eval task needs a missing package: {error}"
            raise ValueError(message) from None
        (out / "general_domain.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
