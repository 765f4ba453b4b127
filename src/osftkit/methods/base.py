"""CausalLMModule: what every LM method shares (optimisation, generation, validation)."""

import json
import math
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from transformers import PreTrainedTokenizerBase, get_scheduler

from osftkit.checkpointing import (
    local_rng_states,
    restore_rng_states,
    rng_states,
    run_seed,
    set_local_rng_states,
)
from osftkit.hardware import (
    FSDP2Strategy,
    average_gradients_outside_fsdp,
    check_master_weights,
    gathered_weights,
)
from osftkit.methods.inputs import RunInputs
from osftkit.methods.losses import masked_mean, token_nll
from osftkit.methods.micro_batches import MicroBatching, TokenBatch, response_mask, scatter_back
from osftkit.methods.optimisation import MicroLoss, Part, backpropagate
from osftkit.metrics import PassAtK
from osftkit.metrics.pass_at_k import counted_rows
from osftkit.models.logprobs import check_logprob_args, token_logprobs
from osftkit.recipes import LMRecipe
from osftkit.rollout import GenerationEngine, HFGenerateEngine, Rollouts
from osftkit.rollout.engine import end_of_turn_ids
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


class CausalLMModule(LightningModule):
    """Base for SFT, OSFT, GRPO and the backdoor methods. Uses manual optimisation so that one
    generated batch can feed several optimiser steps (`self.gradient_step(...)` is one step).

    Each step's mini-batch runs as micro-batches (`micro_batch_size` rows, or a token budget
    `max_tokens_per_micro_batch`), each trimmed to its own longest row, with the gradients
    accumulated and normalised over the whole mini-batch; validation scoring is cut the same way.
    Log-probs go through `token_logprobs` with the LM head in `logprob_chunk_size` positions.
    """

    recipe_type: type[LMRecipe] = LMRecipe

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        recipe: LMRecipe,
        validation: dict[str, Any] | ValidationSettings | None = None,
        engine: GenerationEngine | None = None,
        inputs: RunInputs | None = None,
    ) -> None:
        if not isinstance(recipe, self.recipe_type):
            raise TypeError(f"{type(self).__name__} takes a {self.recipe_type.__name__}")
        check_logprob_args(1.0, recipe.logprob_chunk_size)
        micro_batching = MicroBatching(recipe.micro_batch_size, recipe.max_tokens_per_micro_batch)
        super().__init__()
        self.recipe = recipe
        self.inputs = inputs or RunInputs()
        self.micro_batching = micro_batching
        self.automatic_optimization = False
        self.training_rng: dict[str, Any] | None = None  # set while a validation samples
        # For the loggers only (plain values, so checkpoints load with weights_only=True); the
        # module reads its knobs from `self.recipe`.
        self.save_hyperparameters({"method": asdict(recipe)})
        self.optimizer_factory = (
            instantiate(recipe.optimizer, _convert_="all")
            if isinstance(recipe.optimizer, dict)
            else recipe.optimizer
        )
        self.model = (
            model.train()
        )  # from_pretrained returns eval mode; Lightning toggles it for validation
        self.tokenizer = tokenizer
        self.engine = engine or HFGenerateEngine()
        self.validation_settings = (
            validation
            if isinstance(validation, ValidationSettings)
            else ValidationSettings(**(validation or {}))
        )
        self.val_metrics = nn.ModuleDict()

    # ---- hardware -------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under `hardware=fsdp*`: shard the policy (and the frozen KL reference) with FSDP2."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDP2Strategy):
            return
        for module in (self.model, getattr(self, "reference", None)):
            if module is not None:
                strategy.shard(module)

    # ---- optimisation -------------------------------------------------------------------
    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        check_master_weights(trainable)
        optimizer = self.optimizer_factory(params=trainable)
        settings = self.recipe.scheduler
        scheduler = get_scheduler(
            settings.name if settings else "constant",
            optimizer,
            num_warmup_steps=settings.num_warmup_steps if settings else None,
            num_training_steps=self.training_steps(),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def training_steps(self) -> int:
        """Optimiser steps of the run, for the LR schedule: trainer.max_steps, or with
        max_steps -1 as many as the data gives (Lightning's estimate: epochs x batches)."""
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError(
                "The LR schedule needs the run's length: set trainer.max_steps, or "
                "trainer.max_epochs with trainer.max_steps=-1"
            )
        return int(steps)

    def gradient_step(self, micro_batches: Iterable[Part], micro_loss: MicroLoss) -> dict:
        """One optimiser step, every method's: (zero grad) for each micro-batch loss -> backward;
        then clip, step and schedule. Returns the mini-batch's summed loss and metrics."""
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        totals = backpropagate(micro_batches, micro_loss, self.manual_backward, self.global_step)
        self.average_unsharded_gradients()
        if self.recipe.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no gradients held through the next rollout
        self.lr_schedulers().step()
        return totals

    def micro_batches(self, minibatch: TokenBatch) -> list[TokenBatch]:
        """The mini-batch cut into micro-batches, each trimmed to its own longest row."""
        return [part for _, part in self.micro_batching.split(minibatch)]

    def sum_over_ranks(self, value: Tensor) -> Tensor:
        """`value` summed over the data-parallel ranks (a collective; as is outside a Trainer)."""
        return self.all_gather(value).sum(dim=0) if self._trainer is not None else value

    def on_every_rank(self, decision: bool) -> bool:
        """Whether `decision` holds on every rank (a collective; as is outside a Trainer)."""
        if self._trainer is None:
            return decision
        return self.trainer.strategy.reduce_boolean_decision(decision, all=True)

    def average_unsharded_gradients(self) -> None:
        """FSDP2 averages the gradients of the modules it shards; a tensor trained beside them
        (SANDE's parrot) is averaged over the ranks here. (DDP wraps the whole module.)"""
        if isinstance(self.trainer.strategy, FSDP2Strategy) and self.trainer.world_size > 1:
            average_gradients_outside_fsdp(self.parameters())

    def logprobs(
        self,
        batch: TokenBatch,
        temperature: float = 1.0,
        model: nn.Module | None = None,
        with_entropy: bool = True,
        entropy_grad: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Dense log p(chosen) and entropy at the scored positions of one micro-batch."""
        return token_logprobs(
            self.model if model is None else model,
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            score_mask=batch.score_mask,
            temperature=temperature,
            chunk_size=self.recipe.logprob_chunk_size,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )

    @torch.no_grad()
    def score_tokens(
        self,
        batch: TokenBatch,
        temperature: float = 1.0,
        model: nn.Module | None = None,
        with_entropy: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """`logprobs` of a whole batch without grad, micro-batch by micro-batch."""
        pieces = self.micro_batching.split(batch)
        scored = [self.logprobs(part, temperature, model, with_entropy) for _, part in pieces]
        logp = scatter_back(batch, pieces, [s[0] for s in scored])
        entropy = scatter_back(batch, pieces, [s[1] for s in scored]) if with_entropy else None
        return logp, entropy

    def labelled_nll(self, batch: dict) -> Tensor:
        """`token_nll` of an SFT batch's labelled response tokens, in one forward (no
        micro-batches)."""
        mask = response_mask(batch["labels"])
        logp, _ = self.logprobs(TokenBatch(batch["input_ids"], batch["attention_mask"], mask))
        return token_nll(logp, mask)

    def nll_loss(self, part: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """MicroLoss of SFT: weighted NLL of the scored tokens; entropy for logging."""
        logp, entropy = self.logprobs(part)
        weights = part.per_row["weights"]
        return (-logp * weights).sum(), {"entropy": (entropy * part.per_row["token_mean"]).sum()}

    def minibatch_rows(self) -> int | None:
        """Rows of one training mini-batch on this rank (None when the data does not say)."""
        if self.inputs.batch_size is None:
            return None
        return self.inputs.batch_size // self.trainer.world_size

    def longest_row(self) -> int | None:
        """Tokens of the longest training or validation row (prompt + response)."""
        inputs = self.inputs
        if inputs.max_prompt_length is None or inputs.max_response_length is None:
            return None
        longest_response = max(inputs.max_response_length, self.validation_settings.max_new_tokens)
        return inputs.max_prompt_length + longest_response

    # ---- checkpoints -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Rollouts draw from the global RNGs: a run resumed from this checkpoint must continue
        # their streams to match an uninterrupted run; each rank its own. A checkpoint taken
        # inside a validation (a callback's on_validation_end) keeps the training stream too.
        validation = local_rng_states()
        if self.training_rng is not None:
            set_local_rng_states(self.training_rng)
        checkpoint["rng_states"] = rng_states()
        if self.training_rng is not None:
            set_local_rng_states(validation)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            restore_rng_states(checkpoint["rng_states"])

    # ---- generation ---------------------------------------------------------------------
    def generate(
        self, batch: dict, num_samples: int, temperature: float, top_p: float, max_new_tokens: int
    ) -> Rollouts:
        """Sample from the model as it is now (no grad, eval mode) through the engine; a sharded
        model is gathered once for the whole rollout when the engine decodes with it."""
        gather = self.engine.decodes_with_policy
        with gathered_weights(self.model) if gather else nullcontext():
            return self.engine.generate(
                self.model,
                batch["prompt_ids"],
                batch["prompt_mask"],
                num_samples=num_samples,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                eos_token_id=end_of_turn_ids(self.tokenizer, self.model.generation_config),
                pad_token_id=self.tokenizer.pad_token_id,
            )

    def decode(self, rollouts: Rollouts) -> list[str]:
        ids = (rollouts.response_ids * rollouts.response_mask).tolist()
        lengths = rollouts.lengths.tolist()
        return self.tokenizer.batch_decode(
            [row[:n] for row, n in zip(ids, lengths, strict=True)], skip_special_tokens=True
        )

    def score(self, rollouts: Rollouts, answers: list[str]) -> Tensor:
        """(prompts, G) booleans from the data module's answer checker."""
        golds = [a for a in answers for _ in range(rollouts.group_size)]
        correct = self.inputs.checker.score(self.decode(rollouts), golds)
        return torch.tensor(correct, device=self.device).view(-1, rollouts.group_size)

    # ---- validation ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.micro_batching.check_fits(
            self.minibatch_rows() if stage == "fit" else None, self.longest_row()
        )
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

    def on_validation_start(self) -> None:
        """Validation samples from a stream of its own, seeded by (seed, step, rank), and hands
        the training stream back untouched: how often a run validates, or whether it validated
        before the fit, does not change what it trains on."""
        self.training_rng = local_rng_states()
        torch.manual_seed((run_seed() * 1_000_003 + self.global_step) * 1_009 + self.global_rank)

    def on_validation_end(self) -> None:
        set_local_rng_states(self.training_rng)
        self.training_rng = None

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        s = self.validation_settings
        metrics = self.val_metrics[self.inputs.val_names[dataloader_idx]]
        samples = self.generate(batch, s.n_samples, s.tau_eval, s.top_p, s.max_new_tokens)
        # Rows that only even out the ranks' step counts are generated but not counted.
        counted = counted_rows(batch).to(samples.sequences.device)
        per_sample = counted.repeat_interleave(samples.group_size)
        metrics["pass"].update(self.score(samples, batch["answer"]), counted)
        metrics["response_length"].update(samples.lengths.float(), per_sample.float())
        scored = TokenBatch(samples.sequences, samples.attention_mask, samples.loss_mask)
        _, entropy = self.score_tokens(scored)
        counted_tokens = samples.loss_mask * per_sample[:, None]  # a token mean over the set
        metrics["entropy"].update(masked_mean(entropy, counted_tokens), counted_tokens.sum())
        if s.greedy:
            greedy = self.generate(batch, 1, 0.0, 1.0, s.max_new_tokens)
            correct = self.score(greedy, batch["answer"]).float().squeeze(1)
            metrics["greedy_acc"].update(correct, counted.float())
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
