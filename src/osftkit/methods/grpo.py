"""GRPOModule: G rollouts, binary verifiable reward, group-normalised advantages, clipped ratio;
with its knobs also Dr. GRPO and DAPO (asymmetric clip, dynamic sampling, overlong shaping)."""

import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from osftkit.methods.micro_batches import TokenBatch
from osftkit.methods.rollout_module import RolloutModule, token_batch
from osftkit.recipes import GRPORecipe, OverlongBuffer
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


def overlong_penalty(buffer: OverlongBuffer, lengths: Tensor, max_new_tokens: int) -> Tensor:
    """DAPO's soft length penalty: 0 up to max_new_tokens - L_cache, then linear down to
    -penalty_factor at max_new_tokens (a truncated response gets the full penalty)."""
    over = (lengths.float() - (max_new_tokens - buffer.length)).clamp(min=0)
    return -buffer.penalty_factor * (over / buffer.length).clamp(max=1.0)


def grpo_clip_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, low: float, high: float
) -> Tensor:
    """GRPO's clipped surrogate: -min(r A, clip(r, 1 - low, 1 + high) A), weighted per token;
    r = exp(logp - old_logp), A the row's advantage."""
    ratio = torch.exp(logp - old_logp)
    advantage = advantages[:, None]
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - low, 1 + high) * advantage)
    return (-surrogate * weights).sum()


class GRPOModule(RolloutModule):
    """GRPO (Shao et al. 2024). With several mini-batches per generated batch, the ratio is taken
    against the rollout-time log-probs and clipped to [1 - clip_eps, 1 + clip_eps_high]
    (`clip_eps_high` defaults to `clip_eps`; DAPO's clip-higher is 0.2 / 0.28).

    `normalize_std: false` with `loss_aggregation: seq-mean-token-sum-norm` is Dr. GRPO.
    `dynamic_sampling` ({max_generation_batches}) and `overlong_buffer` ({length,
    penalty_factor}) are DAPO's; the filter looks at correctness, not at the length penalty.
    """

    recipe: GRPORecipe
    recipe_type = GRPORecipe

    def __init__(self, model, tokenizer, recipe: GRPORecipe, **run) -> None:
        super().__init__(model, tokenizer, recipe, **run)
        self.refill_batches: Iterator[dict] | None = None

    @property
    def training_temperature(self) -> float:
        return self.recipe.tau_sample

    def rollout(self, batch: dict) -> tuple[Rollouts, dict]:
        rollouts = self.sample(batch)
        if self.recipe.dynamic_sampling is None:
            return rollouts, batch
        return self.refill(rollouts, batch)

    def refill(self, rollouts: Rollouts, batch: dict) -> tuple[Rollouts, dict]:
        """Keep the groups whose rewards differ; generate from further prompts until there are
        as many as the batch had. Returns the kept rollouts and the batch of their prompts
        (answers and problems, which `targets` scores); the caller's batch is not changed."""
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
            limit = self.recipe.dynamic_sampling.max_generation_batches
            done = len(answers) == wanted or generations == limit
            # Every rank generates as often as the one that needs most: a rollout is a
            # collective (the gathered weights under FSDP, the token count), so counts must agree.
            if self.on_every_rank(done):
                break
            source = self.next_refill_batch()
            rollouts = self.sample(source)
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
            return first, batch
        kept = {**batch, "answer": answers, "problem": problems}
        return concat_rollouts(parts, self.tokenizer.pad_token_id), kept

    def next_refill_batch(self) -> dict:
        """The next batch of the refill stream: the training prompts in an order of their own."""
        if self.refill_batches is None:
            self.refill_batches = self.refill_stream()
        batch = next(self.refill_batches)
        return self.transfer_batch_to_device(batch, self.device, 0)

    def refill_stream(self) -> Iterator[dict]:
        if self.inputs.train_batches is None:
            raise ValueError("dynamic sampling needs a stream of training prompts to refill from")
        while True:  # cycles, reshuffled; the offset keeps it apart from the epochs' orders
            yield from self.inputs.train_batches(REFILL_SEED_OFFSET + self.global_step)

    def targets(self, rollouts: Rollouts, batch: dict) -> dict[str, Tensor]:
        correct = self.score(rollouts, batch["answer"]).float()
        self.log("train/reward", correct.mean(), prog_bar=True)
        rewards = correct
        r = self.recipe
        if r.overlong_buffer is not None:
            lengths = rollouts.lengths.view_as(correct)
            rewards = correct + overlong_penalty(r.overlong_buffer, lengths, r.max_new_tokens)
            self.log("train/overlong_penalty", (rewards - correct).mean())
        extras = {"advantages": group_advantages(rewards, r.normalize_std).flatten()}
        if r.num_minibatches > 1:
            # Later mini-batches train a policy that has moved: they need the rollout log-probs.
            extras["old_logp"], _ = self.score_tokens(
                token_batch(rollouts, {}), self.training_temperature, with_entropy=False
            )
        return extras

    def policy_loss(self, part: TokenBatch, logp: Tensor, entropy: Tensor) -> Tensor:
        # With one update per batch the policy is still the rollout policy: ratio 1, and the
        # gradient is the plain policy gradient, without a second forward pass.
        old_logp = part.per_row.get("old_logp", logp.detach())
        rows, r = part.per_row, self.recipe
        return grpo_clip_loss(
            logp, old_logp, rows["advantages"], rows["weights"], r.clip_eps, r.clip_high
        )


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
