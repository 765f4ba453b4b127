"""Validation: pass@k, greedy accuracy, response length and entropy per validation set, and a
few logged samples."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from osftkit.methods.inputs import RunInputs
from osftkit.methods.losses import masked_mean
from osftkit.methods.micro_batches import TokenBatch
from osftkit.metrics import PassAtK
from osftkit.metrics.pass_at_k import counted_rows
from osftkit.rollout import Rollouts
from osftkit.run_logger import logger_step, verbatim_markdown


@dataclass
class ValidationSettings:
    """The evaluation protocol: n samples per prompt at tau_eval, plus greedy decoding."""

    n_samples: int = 8
    tau_eval: float = 1.0
    ks: tuple[int, ...] = (1, 8)
    top_p: float = 1.0
    max_new_tokens: int = 64
    greedy: bool = True
    log_samples: int = 4

    def __post_init__(self) -> None:
        above = [k for k in self.ks if k > self.n_samples]
        if above:
            raise ValueError(
                f"validation.ks: k={above[0]} exceeds validation.n_samples={self.n_samples} "
                "(pass@k needs at least k samples per problem): raise n_samples or drop that k"
            )


class Validation:
    """CausalLMModule's validation hooks: one MetricCollection per validation set, means over
    the sets (and per set when there are several) logged as val/<metric>."""

    inputs: RunInputs
    validation_settings: ValidationSettings
    val_metrics: nn.ModuleDict

    def add_val_metrics(self) -> None:
        """The metrics of each validation set not yet measured (setup runs once per stage)."""
        settings = self.validation_settings
        for name in self.inputs.val_names:
            if name in self.val_metrics:
                continue
            metrics = {
                "pass": PassAtK(list(settings.ks)),
                "response_length": MeanMetric(),
                "entropy": MeanMetric(),
            }
            if settings.greedy:
                metrics["greedy_acc"] = MeanMetric()
            self.val_metrics[name] = MetricCollection(metrics, compute_groups=False)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        s = self.validation_settings
        name = self.inputs.val_names[dataloader_idx]
        metrics = self.val_metrics[name]
        samples = self.generate(batch, s.n_samples, s.tau_eval, s.top_p, s.max_new_tokens)
        # Rows that only even out the ranks' step counts are generated but not counted.
        counted = counted_rows(batch).to(samples.sequences.device)
        per_sample = counted.repeat_interleave(samples.group_size)
        correct = self.score(samples, batch["answer"])
        metrics["pass"].update(correct, counted)
        sink = getattr(self, "outcome_sink", None)  # eval.py's per-problem records (store=...)
        if sink is not None:
            sink(name, batch["answer"], correct, samples.lengths, self.decode(samples))
        metrics["response_length"].update(samples.lengths.float(), per_sample.float())
        scored = TokenBatch(samples.sequences, samples.attention_mask, samples.loss_mask)
        _, entropy = self.score_tokens(scored)
        counted_tokens = samples.loss_mask * per_sample[:, None]  # a token mean over the set
        metrics["entropy"].update(masked_mean(entropy, counted_tokens), counted_tokens.sum())
        if s.greedy:
            greedy = self.generate(batch, 1, 0.0, 1.0, s.max_new_tokens)
            greedy_correct = self.score(greedy, batch["answer"]).float().squeeze(1)
            metrics["greedy_acc"].update(greedy_correct, counted.float())
        if batch_idx == 0 and dataloader_idx == 0:
            self.log_samples(batch, samples)

    def on_validation_epoch_end(self) -> None:
        per_set = {name: flatten(metrics.compute()) for name, metrics in self.val_metrics.items()}
        for metrics in self.val_metrics.values():
            metrics.reset()
        names = list(per_set)
        for key in per_set[names[0]]:
            values = [per_set[name][key] for name in names]
            self.log(f"val/{key}", torch.stack(values).mean(), sync_dist=False)
            if len(names) > 1:
                for name, value in zip(names, values, strict=True):
                    self.log(f"val/{name}/{key}", value, sync_dist=False)

    def log_samples(self, batch: dict, samples: Rollouts) -> None:
        """A few generations to TensorBoard (as text) and to samples/ in the run directory."""
        count = min(self.validation_settings.log_samples, len(batch["problem"]))
        if count == 0 or not self.trainer.is_global_zero:
            return
        texts = self.decode(samples)[:: samples.group_size][:count]
        rows = [
            {"step": self.global_step, "problem": p, "answer": a, "response": t}
            for p, a, t in zip(batch["problem"], batch["answer"], texts, strict=False)
        ]
        out = Path(self.trainer.default_root_dir) / "samples" / "val.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                text = "\n\n".join(
                    verbatim_markdown(f"{r['problem']}  (gold {r['answer']})\n{r['response']}")
                    for r in rows
                )
                logger.experiment.add_text("val/samples", text, logger_step(self.trainer))


def flatten(computed: dict) -> dict[str, Tensor]:
    """MetricCollection output -> flat names (`pass` expands to pass@k)."""
    flat = {}
    for key, value in computed.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat
