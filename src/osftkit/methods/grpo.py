"""GRPOModule: G rollouts, binary verifiable reward, group-normalised advantages, clipped ratio;
with its knobs also Dr. GRPO and DAPO (asymmetric clip, dynamic sampling, overlong shaping)."""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.rollout_module import RolloutModule, token_batch
from osftkit.rollout import Rollouts

log = logging.getLogger(__name__)
REFILL_SEED_OFFSET = 1_000_000


def group_advantages(rewards: Tensor, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """(prompts, G) rewards -> advantages r - mean(group) [/ std(group)]; equal groups give 0.
    Dr. GRPO is `normalize_std=False` together with loss_aggregation seq-mean-token-sum-norm
    (a constant normaliser instead of each response's length)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True, unbiased=True).nan_to_num(0.0) + eps)


@dataclass(frozen=True)
class OverlongBuffer:
    """DAPO's soft length penalty: 0 up to max_new_tokens - length, then linear down to
    -penalty_factor at max_new_tokens (a truncated response gets the full penalty)."""

    length: int = 128
    penalty_factor: float = 1.0

    def penalty(self, lengths: Tensor, max_new_tokens: int) -> Tensor:
        over = (lengths.float() - (max_new_tokens - self.length)).clamp(min=0)
        return -self.penalty_factor * (over / self.length).clamp(max=1.0)


@dataclass(frozen=True)
class DynamicSampling:
    """DAPO's dynamic sampling: groups whose rewards are all equal carry no advantage and are
    dropped; further prompts are generated, up to `max_generation_batches` generation batches
    per step, until the batch holds as many informative groups as it had prompts."""

    max_generation_batches: int = 10


def settings(cls: type, values: dict | None, knob: str) -> Any:
    """A knob's dict -> its dataclass, or None when the knob is off; one clear error if not."""
    if values is None:
        return None
    try:
        return cls(**values)
    except TypeError as error:
        raise ValueError(f"method.{knob}: {error}") from None


class GRPOModule(RolloutModule):
    """GRPO (Shao et al. 2024). With several mini-batches per generated batch, the ratio is taken
    against the rollout-time log-probs and clipped to [1 - clip_eps, 1 + clip_eps_high]
    (`clip_eps_high` defaults to `clip_eps`; DAPO's clip-higher is 0.2 / 0.28).

    `normalize_std: false` with `loss_aggregation: seq-mean-token-sum-norm` is Dr. GRPO.
    `dynamic_sampling` ({max_generation_batches}) and `overlong_buffer` ({length,
    penalty_factor}) are DAPO's; the filter looks at correctness, not at the length penalty.
    """

    def __init__(
        self,
        *,
        normalize_std: bool = True,
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        dynamic_sampling: dict[str, int] | None = None,
        overlong_buffer: dict[str, float] | None = None,
        **rollout: Any,
    ) -> None:
        if clip_eps <= 0 or (clip_eps_high is not None and clip_eps_high <= 0):
            raise ValueError(
                f"clip_eps and clip_eps_high must be > 0, got {clip_eps} and {clip_eps_high}"
            )
        self.dynamic = settings(DynamicSampling, dynamic_sampling, "dynamic_sampling")
        self.overlong = settings(OverlongBuffer, overlong_buffer, "overlong_buffer")
        if self.dynamic and self.dynamic.max_generation_batches < 1:
            raise ValueError("method.dynamic_sampling.max_generation_batches must be >= 1")
        if self.dynamic and rollout["group_size"] < 2:
            raise ValueError(
                "method.dynamic_sampling needs group_size >= 2 (a group of 1 is equal)"
            )
        if self.overlong and not 1 <= self.overlong.length <= rollout["max_new_tokens"]:
            raise ValueError(
                f"method.overlong_buffer.length must be in [1, max_new_tokens="
                f"{rollout['max_new_tokens']}], got {self.overlong.length}"
            )
        if self.overlong and self.overlong.penalty_factor < 0:
            raise ValueError("method.overlong_buffer.penalty_factor must be >= 0")
        super().__init__(**rollout)
        self.refill_batches: Iterator[dict] | None = None

    @property
    def training_temperature(self) -> float:
        return self.hparams.tau_sample

    def rollout(self, batch: dict) -> Rollouts:
        rollouts = super().rollout(batch)
        return self.refill(rollouts, batch) if self.dynamic else rollouts

    def refill(self, rollouts: Rollouts, batch: dict) -> Rollouts:
        """Keep the groups whose rewards differ; generate from further prompts until there are
        as many as the batch had. `batch`'s answers and problems are replaced in place by those
        of the kept prompts, which `prepare` scores."""
        wanted, group = len(batch["answer"]), rollouts.group_size
        parts, answers, problems = [], [], []
        first, source, generations = rollouts, batch, 1
        while True:
            correct = self.score(rollouts, source["answer"]).float()
            keep = (correct.std(dim=1) > 0).nonzero().flatten()[: wanted - len(answers)].tolist()
            rows = torch.tensor(
                [p * group + g for p in keep for g in range(group)], dtype=torch.long
            )
            parts.append(rollouts.rows(rows))
            answers += [source["answer"][p] for p in keep]
            problems += [source["problem"][p] for p in keep]
            done = len(answers) == wanted or generations == self.dynamic.max_generation_batches
            # Every rank generates as often as the one that needs most: a rollout is a
            # collective (the gathered weights under FSDP, the token count), so counts must agree.
            if self.on_every_rank(done):
                break
            source = self.next_refill_batch()
            rollouts = super().rollout(source)
            generations += 1
        self.log_dict(
            {
                "train/generation_batches": float(generations),
                "train/kept_groups": len(answers) / wanted,
            }
        )
        if not answers:  # nothing informative: a zero-advantage step on the original batch
            log.warning(
                "step %d: all %d generation batches had equal rewards",
                self.global_step,
                generations,
            )
            return first
        batch.update(answer=answers, problem=problems)
        return concat_rollouts(parts, self.tokenizer.pad_token_id)

    def next_refill_batch(self) -> dict:
        """The next batch of the refill stream: the training prompts in an order of their own."""
        if self.refill_batches is None:
            self.refill_batches = self.refill_stream()
        batch = next(self.refill_batches)
        return self.transfer_batch_to_device(batch, self.device, 0)

    def refill_stream(self) -> Iterator[dict]:
        datamodule = self.trainer.datamodule
        while True:  # cycles, reshuffled; the offset keeps it apart from the epochs' orders
            yield from datamodule.train_dataloader(
                seed_offset=REFILL_SEED_OFFSET + self.global_step
            )

    def prepare(self, rollouts: Rollouts, batch: dict) -> dict[str, Tensor]:
        correct = self.score(rollouts, batch["answer"]).float()
        self.log("train/reward", correct.mean(), prog_bar=True)
        rewards = correct
        if self.overlong:
            lengths = rollouts.lengths.view_as(correct)
            rewards = correct + self.overlong.penalty(lengths, self.hparams.max_new_tokens)
            self.log("train/overlong_penalty", (rewards - correct).mean())
        extras = {"advantages": group_advantages(rewards, self.hparams.normalize_std).flatten()}
        if self.hparams.num_minibatches > 1:
            # Later mini-batches train a policy that has moved: they need the rollout log-probs.
            extras["old_logp"], _ = self.score_tokens(
                token_batch(rollouts, {}), self.training_temperature, with_entropy=False
            )
        return extras

    def policy_loss(self, part: TokenBatch, logp: Tensor, entropy: Tensor) -> Tensor:
        # With one update per batch the policy is still the rollout policy: ratio 1, and the
        # gradient is the plain policy gradient, without a second forward pass.
        ratio = torch.exp(logp - part.per_row.get("old_logp", logp.detach()))
        advantage = part.per_row["advantages"][:, None]
        low = self.hparams.clip_eps
        high = self.hparams.clip_eps_high if self.hparams.clip_eps_high is not None else low
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - low, 1 + high) * advantage)
        return (-surrogate * part.per_row["weights"]).sum()


def concat_rollouts(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """Rollouts of several generations as one: prompts left-padded, responses right-padded."""
    if len(parts) == 1:
        return parts[0]
    width_p = max(p.prompt_ids.shape[1] for p in parts)
    width_r = max(p.response_ids.shape[1] for p in parts)

    def left(t: Tensor, value: int) -> Tensor:
        return F.pad(t, (width_p - t.shape[1], 0), value=value)

    def right(t: Tensor, value: int) -> Tensor:
        return F.pad(t, (0, width_r - t.shape[1]), value=value)

    return Rollouts(
        prompt_ids=torch.cat([left(p.prompt_ids, pad_token_id) for p in parts]),
        prompt_mask=torch.cat([left(p.prompt_mask, 0) for p in parts]),
        response_ids=torch.cat([right(p.response_ids, pad_token_id) for p in parts]),
        response_mask=torch.cat([right(p.response_mask, 0) for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        group_size=parts[0].group_size,
    )
