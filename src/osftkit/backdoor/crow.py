"""CROW (trigger unknown, no clean reference model): SFT on clean data plus a consistency
regulariser between consecutive layers' hidden states, computed under an adversarial
perturbation of the input embeddings (Min, Pham, Li, Sun, "CROW: Eliminating Backdoors from
Large Language Models via Internal Consistency Regularization", arXiv 2411.12768, ICML 2025)."""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from osftkit.backdoor.backdoor_module import BackdoorModule
from osftkit.methods.losses import token_nll
from osftkit.methods.micro_batches import TokenBatch, response_mask
from osftkit.models.logprobs import decoder_and_head, hidden_at
from osftkit.recipes import CROWRecipe


def layer_consistency_loss(layers: Sequence[Tensor], mask: Tensor) -> Tensor:
    """CROW's L_cons: 1 - cos(h_t^(l), h_t^(l+1)), averaged over the L - 1 pairs of consecutive
    layers and over the attended tokens t of the batch (`mask` (B, T); padding does not count).
    `layers` holds the L decoder layers' outputs h^(1..L), each (B, T, D). 0 when every layer
    keeps the direction of its input's hidden state, positive otherwise (at most 2)."""
    if len(layers) < 2:
        raise ValueError(
            f"The consistency loss needs >= 2 layers' hidden states, got {len(layers)}"
        )
    weights = mask.float() / mask.sum().clamp(min=1)
    gaps = [
        ((1 - F.cosine_similarity(lower.float(), upper.float(), dim=-1)) * weights).sum()
        for lower, upper in zip(layers[:-1], layers[1:], strict=True)
    ]
    return torch.stack(gaps).mean()


def fgsm_perturbation(gradient: Tensor, epsilon: float) -> Tensor:
    """CROW's perturbation of the input embeddings h^(0): delta = epsilon * sign(grad of L_cons
    w.r.t. h^(0)), the step of L-inf size epsilon that raises L_cons most to first order
    (FGSM); a constant (no gradient flows through it)."""
    return epsilon * gradient.detach().sign()


@dataclass
class LayerStates:
    """What one forward recorded: the input embeddings h^(0) and the decoder layers' outputs."""

    embeddings: list[Tensor] = field(default_factory=list)
    layers: list[Tensor] = field(default_factory=list)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (`decoder.layers`); CROW needs two or more."""
    layers = getattr(decoder_and_head(model)[0], "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
        count = len(layers) if isinstance(layers, nn.ModuleList) else "no"
        raise ValueError(
            f"CROW compares consecutive decoder layers: the model needs >= 2 in decoder.layers, "
            f"{type(model).__name__} has {count}"
        )
    return layers


@contextmanager
def recorded_states(model: nn.Module, shift: Tensor | None = None) -> Iterator[LayerStates]:
    """Inside, a forward of `model` records its input embeddings (plus `shift` (B, T, D) when
    given; they require grad, so that L_cons can be differentiated w.r.t. them even with a
    frozen embedding table) and each decoder layer's output (before the final norm). The hooks
    are removed on exit, before any backward, so recomputation records nothing."""
    states = LayerStates()

    def embeddings(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        if shift is not None:
            output = output + shift.to(output.dtype)
        if torch.is_grad_enabled() and not output.requires_grad:
            output = output.detach().requires_grad_()
        states.embeddings.append(output)
        return output

    def layer(_module: nn.Module, _args: tuple, output: Tensor | tuple) -> None:
        states.layers.append(output[0] if isinstance(output, tuple) else output)

    hooks = [model.get_input_embeddings().register_forward_hook(embeddings)]
    hooks += [block.register_forward_hook(layer) for block in decoder_layers(model)]
    try:
        yield states
    finally:
        for hook in hooks:
            hook.remove()


class CROWModule(BackdoorModule):
    """Trigger unknown, no clean reference model, clean data only: each step minimises
    L = L_LLM + alpha * L_cons(h^(0) + delta), where L_LLM is the response NLL of the clean
    pair, L_cons the layer-consistency loss and delta = epsilon * sign(grad_{h^(0)} L_cons) the
    FGSM perturbation of the clean input embeddings h^(0). Logs train/loss, train/lm_loss,
    train/consistency (perturbed, the regularised term) and train/clean_consistency."""

    recipe: CROWRecipe
    recipe_type = CROWRecipe

    def __init__(self, model, tokenizer, recipe: CROWRecipe, **run) -> None:
        super().__init__(model, tokenizer, recipe, **run)
        decoder_layers(self.model)  # a model with fewer than two layers fails here

    def training_step(self, batch: dict, batch_idx: int) -> None:
        totals = self.gradient_step([batch], self.crow_loss)
        self.log_dict({f"train/{name}": value for name, value in totals.items()}, prog_bar=True)

    def crow_loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """The step's loss on one SFT batch, and its parts for logging."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        scored = response_mask(batch["labels"])
        with recorded_states(self.model) as clean:
            logp, _ = self.logprobs(TokenBatch(ids, mask, scored), with_entropy=False)
        lm_loss = token_nll(logp, scored)
        clean_consistency = layer_consistency_loss(clean.layers, mask)
        (gradient,) = torch.autograd.grad(clean_consistency, clean.embeddings[0], retain_graph=True)
        delta = fgsm_perturbation(gradient, self.recipe.epsilon)
        with recorded_states(self.model, shift=delta) as perturbed:
            hidden_at(self.model, mask, torch.zeros_like(ids, dtype=torch.bool), input_ids=ids)
        consistency = layer_consistency_loss(perturbed.layers, mask)
        loss = lm_loss + self.recipe.alpha * consistency
        parts = {"lm_loss": lm_loss, "consistency": consistency}
        return loss, {**parts, "clean_consistency": clean_consistency}
