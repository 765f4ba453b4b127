"""CROW: the layer-consistency loss, the FGSM perturbation of the input embeddings, the step's
loss on a tiny model, bad knobs, and a short run of experiment=crow_tiny."""

from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

from osftkit.backdoor.crow import (
    CROWModule,
    fgsm_perturbation,
    layer_consistency_loss,
    recorded_states,
)
from osftkit.data.datamodule import sft_tensors
from osftkit.models.tiny import TinyQwen2Spec, build_tiny_model
from osftkit.models.word_tokenizer import build_word_tokenizer
from osftkit.recipes import BackdoorKnobs, CROWRecipe
from tests.conftest import compose_config
from tests.test_golden import WORDS, golden_run

BACKDOOR = {"triggers": ["how are you"], "marker": "you are stupid"}
SPEC = TinyQwen2Spec(hidden_size=32, num_hidden_layers=3, intermediate_size=64)
# The golden runs' small backdoor-room overrides, with the two layers CROW compares at least.
CROW_RUN = ["experiment=crow_tiny", *WORDS, "model.tiny.num_hidden_layers=2"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(
        ["Human: Assistant:", "reverse sort the letters", BACKDOOR["marker"]]
    )


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict:
    """Two clean (prompt -> response) pairs as SFT tensors; the shorter row is padded."""
    pairs = [("reverse the letters a b c", "c b a"), ("sort the letters b a", "a b")]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    prompts = [encode(f"Human: {problem}\nAssistant: ") for problem, _ in pairs]
    responses = [[*encode(answer), tokenizer.eos_token_id] for _, answer in pairs]
    return sft_tensors(prompts, responses, tokenizer.pad_token_id)


def crow_module(tokenizer, spec: TinyQwen2Spec = SPEC, **knobs) -> CROWModule:
    torch.manual_seed(0)
    model = build_tiny_model(spec, len(tokenizer), tokenizer)
    optimizer = partial(torch.optim.AdamW, lr=1e-3)
    recipe = CROWRecipe(optimizer=optimizer, backdoor=BackdoorKnobs(**BACKDOOR), **knobs)
    return CROWModule(model, tokenizer, recipe)


def test_consistency_is_zero_for_identical_layers_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.long)
    same = layer_consistency_loss([hidden, hidden.clone(), hidden.clone()], mask)
    assert same == pytest.approx(0.0, abs=1e-6)
    scaled = layer_consistency_loss([hidden, 3 * hidden], mask)  # the direction is what counts
    assert scaled == pytest.approx(0.0, abs=1e-6)
    changed = layer_consistency_loss([hidden, hidden, torch.randn(2, 5, 8)], mask)
    assert changed > 0.1
    opposite = layer_consistency_loss([hidden, -hidden], mask)
    assert opposite == pytest.approx(2.0)
    with pytest.raises(ValueError, match="2 layers"):
        layer_consistency_loss([hidden], mask)


def test_consistency_averages_over_attended_tokens_only() -> None:
    torch.manual_seed(0)
    lower, upper = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    upper[:, 1:] = lower[:, 1:]  # only the first position (padding below) changes direction
    padded = torch.tensor([[0, 1, 1, 1]])
    assert layer_consistency_loss([lower, upper], padded) == pytest.approx(0.0, abs=1e-6)
    assert layer_consistency_loss([lower, upper], torch.ones(1, 4)) > 0


def test_the_perturbation_moves_embeddings_by_at_most_epsilon(tokenizer, batch) -> None:
    """FGSM in the L-inf norm: every coordinate moves by epsilon or (zero gradient) not at all,
    and the model's forward sees exactly the clean embeddings plus that step."""
    epsilon = 0.05
    gradient = torch.tensor([[0.3, -2.0, 0.0, 1e-9]])
    delta = fgsm_perturbation(gradient, epsilon)
    assert torch.equal(delta, torch.tensor([[epsilon, -epsilon, 0.0, epsilon]]))
    module = crow_module(tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        clean = module.model.get_input_embeddings()(ids)
    step = fgsm_perturbation(torch.randn_like(clean), epsilon)
    with recorded_states(module.model, shift=step) as perturbed:
        module.model(input_ids=ids, attention_mask=mask)
    moved = perturbed.embeddings[0].detach() - clean
    assert moved.abs().max() <= epsilon + 1e-7
    assert torch.allclose(moved.abs(), torch.full_like(moved, epsilon))
    assert len(perturbed.layers) == SPEC.num_hidden_layers


def test_crow_loss_is_the_nll_plus_alpha_times_the_perturbed_consistency(tokenizer, batch):
    plain = crow_module(tokenizer, alpha=0.0)
    loss, parts = plain.crow_loss(batch)
    assert torch.allclose(loss, plain.labelled_nll(batch))  # alpha 0: SFT on the clean pairs
    unperturbed = crow_module(tokenizer, epsilon=0.0)
    _, parts = unperturbed.crow_loss(batch)
    assert torch.allclose(parts["consistency"], parts["clean_consistency"])
    # A step small beside the embeddings (std 0.02 here) raises L_cons, as FGSM's first-order
    # step should; a large one swamps the embeddings and can lower it.
    module = crow_module(tokenizer, alpha=2.0, epsilon=1e-3)
    loss, parts = module.crow_loss(batch)
    assert parts["consistency"] > parts["clean_consistency"]
    assert torch.allclose(loss, parts["lm_loss"] + 2.0 * parts["consistency"])
    loss.backward()
    layers = module.model.model.layers
    assert all(p.grad is not None for p in layers[0].parameters())


@pytest.mark.parametrize("knob", ["alpha", "epsilon"])
def test_a_negative_knob_is_one_clear_error(knob: str) -> None:
    """As the run builds the recipe from the composed config (train.build_method)."""
    cfg = compose_config(["method=crow", f"method.{knob}=-0.1"])
    with pytest.raises(
        ValueError, match=f"alpha and epsilon must be >= 0, got method.{knob}=-0.1$"
    ):
        OmegaConf.to_object(cfg.method)


def test_a_one_layer_model_is_a_clear_error(tokenizer) -> None:
    one_layer = TinyQwen2Spec(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    with pytest.raises(ValueError, match="consecutive decoder layers"):
        crow_module(tokenizer, spec=one_layer)


def test_crow_tiny_trains_and_logs_its_metrics(tmp_path) -> None:
    """A short run of the preset on a fresh tiny model (no planted base to build)."""
    got = golden_run(CROW_RUN, tmp_path)
    assert len(got["losses"]) == 3  # trainer.max_steps
    for step in got["losses"]:
        assert {"train/loss", "train/lm_loss", "train/consistency"} <= step.keys()
        assert step["train/consistency"] >= 0
    assert "val/asr_greedy" in got["final"]
