"""FeatureTestCallback: run a feature test with FDR control on validation inputs during training."""

from collections.abc import Sequence
from typing import Any, Literal, Protocol

import lightning as L
import matplotlib
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from osftkit.data.null_samplers import Sampler
from osftkit.interpret.calibration import check_pvalues
from osftkit.interpret.captum_baselines import METHODS, attribute
from osftkit.interpret.fdr_control import FdrMethod, check_alpha
from osftkit.interpret.feature_test import FeatureTestInputs, FeatureTestResult, irt, one_shot_test
from osftkit.metrics.discovery_rates import best_tpr_at_fdr, fdr_tpr, fdr_tpr_curve

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

NUM_SHOWN = 8  # instances drawn as highlighted text or heatmaps


class FeatureData(Protocol):
    """The data a FeatureTestCallback is handed: its counterfactual sampler and validation set."""

    def feature_sampler(self) -> Sampler: ...

    def val_dataloader(self) -> Any: ...


class FeatureTestCallback(L.Callback):
    """Tests which input features drive the module's score, with FDR control, and logs them.

    Protocol: the LightningModule implements ``feature_test_inputs(batch) -> FeatureTestInputs``
    (``osftkit.interpret.feature_test``): the inputs (n, *shape) to test, a batched
    ``score_fn(inputs, instance) -> (b,)`` (a class log-probability, a regression output, or for
    an LM log p(marker | prompt) with ``instance`` saying whose target to score), a
    ``feature_mask`` of the input's trailing shape with ids 0..d-1 (columns, patches, token
    positions), and optionally the ground truth (n, d) and ``token_strings`` to show text. The
    callback is handed ``data`` (train.py hands the run's datamodule to a callback entry with a
    ``data`` key): the counterfactual sampler is ``sampler`` or, if None,
    ``data.feature_sampler()``; the batch is the fit's first validation batch, or ``data``'s.

    After every ``every_n_validations``-th validation run (``at="validation_end"``) or once at the
    end of fit, the first validation batch is tested (one-shot or IRT) and the callback logs
    the discovery count, the realised FDR/TPR when truth is known, a table of discoveries and,
    for text and images, highlighted tokens or patch heatmaps; ``captum_methods`` adds the best
    TPR those attributions reach at realised FDR <= alpha on the same inputs.
    """

    def __init__(
        self,
        test: Literal["one_shot", "irt"] = "one_shot",
        alpha: float = 0.1,
        two_sided: bool = False,
        offset: int = 1,
        num_draws: int = 100,
        fdr_method: FdrMethod = "bh",
        auto_draws: bool = False,
        at: Literal["validation_end", "fit_end"] = "validation_end",
        every_n_validations: int = 1,
        sampler: Sampler | None = None,
        data: FeatureData | None = None,
        captum_methods: Sequence[str] = (),
        batch_size: int = 4096,
        max_table_rows: int = 50,
        seed: int = 0,
    ) -> None:
        check_alpha(alpha)
        if test not in ("one_shot", "irt") or at not in ("validation_end", "fit_end"):
            raise ValueError(
                f"test must be one_shot|irt and at validation_end|fit_end: {test}, {at}"
            )
        if every_n_validations < 1 or num_draws < 1:
            raise ValueError("every_n_validations and num_draws (K) must be at least 1")
        if unknown := set(captum_methods) - set(METHODS):
            raise ValueError(
                f"unknown captum methods {sorted(unknown)}; choose from {sorted(METHODS)}"
            )
        self.test, self.alpha, self.two_sided, self.offset = test, alpha, two_sided, offset
        self.num_draws, self.fdr_method, self.auto_draws = num_draws, fdr_method, auto_draws
        self.at, self.every_n_validations = at, every_n_validations
        self.sampler, self.data = sampler, data
        self.validations = 0
        self.captum_methods, self.batch_size = list(captum_methods), batch_size
        self.max_table_rows, self.seed = max_table_rows, seed
        self.last_result: FeatureTestResult | None = None
        self.last_metrics: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at != "validation_end" or trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at == "fit_end":
            self.run(trainer, pl_module)

    def run_test(self, test: FeatureTestInputs, sampler: Sampler) -> FeatureTestResult:
        common = {"two_sided": self.two_sided, "batch_size": self.batch_size, "seed": self.seed}
        if self.test == "one_shot":
            return one_shot_test(test, sampler, self.alpha, offset=self.offset, **common)
        return irt(
            test,
            sampler,
            self.alpha,
            self.num_draws,
            method=self.fdr_method,
            auto_draws=self.auto_draws,
            **common,
        )

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Test the first validation batch and log the discoveries."""
        if not hasattr(pl_module, "feature_test_inputs"):
            raise TypeError(
                f"{type(pl_module).__name__} has no feature_test_inputs(batch): see the protocol "
                "in FeatureTestCallback's docstring"
            )
        if self.sampler is None and self.data is None:
            raise ValueError(
                "FeatureTestCallback needs a counterfactual sampler: hand it `sampler` or the "
                "`data` whose feature_sampler() draws them"
            )
        if self.sampler is None:  # built at the test: a sampler may be fitted to set-up data
            self.sampler = self.data.feature_sampler()
        loader = trainer.val_dataloaders or (self.data and self.data.val_dataloader())
        if isinstance(loader, list | tuple):  # several validation sets: test the first
            loader = loader[0]
        if loader is None:
            raise ValueError("FeatureTestCallback needs validation batches: hand it `data`")
        batch = pl_module.transfer_batch_to_device(next(iter(loader)), pl_module.device, 0)
        was_training = pl_module.training
        pl_module.eval()
        with torch.inference_mode(False):
            test = pl_module.feature_test_inputs(batch)
            result = self.run_test(test, self.sampler)
            metrics = self.metrics(test, result)
        pl_module.train(was_training)
        self.last_result, self.last_metrics = result, metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                self.log_visuals(logger, test, result, trainer.global_step)

    def metrics(self, test: FeatureTestInputs, result: FeatureTestResult) -> dict[str, float]:
        out = {"feature_test/discoveries": float(result.discoveries.sum())}
        if test.truth is None:
            return out
        truth = test.truth.cpu().bool()
        out["feature_test/fdr"], out["feature_test/tpr"] = fdr_tpr(result.discoveries.cpu(), truth)
        if result.pvalues is not None and (~truth).any():
            # The known-null hypotheses are a calibration check of the sampler on this batch.
            null = check_pvalues(result.pvalues.cpu()[~truth], self.num_draws)
            out["feature_test/null_floor_fraction"] = null.floor_fraction
            out["feature_test/calibration_pvalue"] = null.pvalue
        for method in self.captum_methods:
            scores = attribute(method, test).cpu()
            out[f"feature_test/{method}_tpr_at_fdr"] = best_tpr_at_fdr(scores, truth, self.alpha)
        return out

    def log_visuals(
        self,
        logger: TensorBoardLogger,
        test: FeatureTestInputs,
        result: FeatureTestResult,
        step: int,
    ) -> None:
        writer = logger.experiment
        writer.add_text(
            "feature_test/discoveries", discovery_table(result, self.max_table_rows), step
        )
        if test.token_strings is not None:
            writer.add_text("feature_test/tokens", highlighted_tokens(test, result), step)
        elif test.inputs.dim() >= 3:
            writer.add_figure("feature_test/patches", patch_heatmaps(test, result), step)
        if test.truth is not None:
            scores, truth = ranking(result), test.truth.cpu().bool()
            # precision = 1 - FDR and recall = TPR of selecting the top-k pooled scores.
            writer.add_pr_curve("feature_test/fdr_tpr", truth.flatten(), scores.flatten(), step)
            writer.add_figure("feature_test/fdr_tpr_curve", fdr_tpr_figure(scores, truth), step)
            if result.pvalues is not None:
                null = result.pvalues.cpu()[~truth]
                writer.add_histogram("feature_test/null_pvalues", null[~null.isnan()], step)


def discovery_table(result: FeatureTestResult, max_rows: int) -> str:
    """Markdown table of the strongest discoveries."""
    idx = result.discoveries.nonzero()
    order = result.statistics[idx[:, 0], idx[:, 1]].argsort(descending=True)[:max_rows]
    rows = ["| instance | feature | statistic | p-value |", "|---|---|---|---|"]
    for i, j in idx[order].tolist():
        p = "-" if result.pvalues is None else f"{result.pvalues[i, j]:.4f}"
        rows.append(f"| {i} | {j} | {result.statistics[i, j]:.4g} | {p} |")
    return "\n".join(rows) if idx.numel() else "no discoveries"


def ranking(result: FeatureTestResult) -> Tensor:
    """Scores in [0, 1] that rank hypotheses as the test does: 1 - p (IRT) or the statistic
    (one-shot), min-max scaled; untested hypotheses rank last."""
    raw = result.statistics if result.pvalues is None else 1 - result.pvalues
    raw = raw.detach().double().cpu()
    low, high = raw.nan_to_num(torch.inf).min(), raw.nan_to_num(-torch.inf).max()
    return ((raw - low) / (high - low).clamp(min=1e-12)).nan_to_num(0.0).float()


def fdr_tpr_figure(scores: Tensor, truth: Tensor) -> Any:
    fdr, tpr = fdr_tpr_curve(scores, truth)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot(fdr.numpy(), tpr.numpy())
    ax.set(xlabel="realised FDR (top-k)", ylabel="TPR", xlim=(0, 1), ylim=(0, 1.02))
    fig.tight_layout()
    return fig


MARKDOWN_SPECIAL = "\\`*_{}[]()#+-.!|<>~"


def escape_markdown(text: str) -> str:
    """Text shown verbatim by TensorBoard's Markdown renderer (a token may be '*' or '<b>')."""
    return "".join(f"\\{ch}" if ch in MARKDOWN_SPECIAL else ch for ch in text)


def position_discoveries(test: FeatureTestInputs, result: FeatureTestResult) -> Tensor:
    """(n, L) whether a discovered feature covers each token position (spans may overlap)."""
    masks = torch.stack([test.mask(j) for j in range(test.num_features)]).float().cpu()
    return (result.discoveries.float().cpu() @ masks) > 0


def highlighted_tokens(test: FeatureTestInputs, result: FeatureTestResult) -> str:
    """Sentences with discovered tokens in bold, every token escaped (shown verbatim)."""
    vocab, covered = test.token_strings, position_discoveries(test, result)
    lines = [
        " ".join(
            f"**{escape_markdown(vocab[t])}**" if hit else escape_markdown(vocab[t])
            for t, hit in zip(ids, hits, strict=True)
        )
        for ids, hits in zip(test.inputs[:NUM_SHOWN].tolist(), covered.tolist(), strict=False)
    ]
    return "\n\n".join(lines)


def first_channel(image: Tensor) -> Tensor:
    """(H, W) view of a (..., H, W) image or per-pixel map."""
    return image.reshape(-1, *image.shape[-2:])[0]


def patch_heatmaps(test: FeatureTestInputs, result: FeatureTestResult) -> Any:
    """Images with the statistic of their discovered patches overlaid."""
    shown = min(NUM_SHOWN, test.inputs.shape[0])
    fig, axes = plt.subplots(1, shown, figsize=(2 * shown, 2.2), squeeze=False)
    mask = test.feature_mask.cpu()
    for ax, image, stats, disc in zip(
        axes[0], test.inputs.cpu(), result.statistics, result.discoveries, strict=False
    ):
        ax.imshow(first_channel(image), cmap="gray")
        ax.imshow(
            first_channel(torch.where(disc, stats, torch.nan)[mask]), cmap="autumn", alpha=0.6
        )
        ax.axis("off")
    fig.tight_layout()
    return fig
