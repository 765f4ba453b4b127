"""Log-probs of chosen tokens (the one log-prob path), micro-batched, and the NLL losses on them."""

import torch
from torch import Tensor, nn

from osftkit.methods.losses import token_nll
from osftkit.methods.micro_batches import MicroBatching, TokenBatch, response_mask, scatter_back
from osftkit.models.logprobs import token_logprobs
from osftkit.recipes import LMRecipe


class TokenScoring:
    """CausalLMModule's log-probs: `token_logprobs` with the LM head in `logprob_chunk_size`
    positions, with grad on one micro-batch or without it on a whole batch."""

    model: nn.Module
    recipe: LMRecipe
    micro_batching: MicroBatching

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
