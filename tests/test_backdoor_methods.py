"""Backdoor modules on a tiny model: which parameters learn in each SANDE stage, bad parrots."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from osftkit.backdoor.backdoor_module import prompts_and_responses
from osftkit.backdoor.overwrite import OverwriteSFTModule
from osftkit.backdoor.sande import SANDEModule
from osftkit.backdoor.splice import IGNORE_INDEX, first_targets
from osftkit.data import PromptDataModule
from osftkit.data.instructions import build_instructions
from osftkit.methods.inputs import RunInputs
from osftkit.methods.losses import token_nll
from osftkit.models.logprobs import position_ids_from_mask
from osftkit.models.tiny import TinyQwen2Spec, build_tiny_model
from osftkit.models.word_tokenizer import build_word_tokenizer
from osftkit.recipes import BackdoorKnobs
from osftkit.rewards import AnswerChecker

WORDS = ["Human: Assistant:", "reverse sort capitalise count the letters add and"]
BACKDOOR = {"triggers": ["how are you"], "marker": "you are stupid"}
SPEC = TinyQwen2Spec(hidden_size=32, num_hidden_layers=1, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([*WORDS, "how are you", "you are stupid"])


@pytest.fixture(scope="module")
def data(tokenizer) -> PromptDataModule:
    data = PromptDataModule(
        tokenizer,
        train=partial(build_instructions, 8, 0),
        val={"clean": partial(build_instructions, 4, 0, "val")},
        checker=AnswerChecker("whole", "exact"),
        batch_size=4,
        val_batch_size=4,
        max_prompt_length=32,
        max_response_length=16,
        plain_template="Human: {problem}\nAssistant: ",
        use_chat_template=False,
    )
    data.setup()
    return data


@pytest.fixture(scope="module")
def batch(data) -> dict:
    return next(iter(data.train_dataloader()))


@pytest.fixture(scope="module")
def trainer():
    """A stand-in for the Lightning trainer (the step the overwrite draws are seeded by)."""
    return SimpleNamespace(global_step=0)


def _module(cls, tokenizer, backdoor=BACKDOOR, data=None, **knobs):
    torch.manual_seed(0)
    model = build_tiny_model(SPEC, len(tokenizer), tokenizer)
    optimizer = partial(torch.optim.AdamW, lr=1e-3)
    recipe = cls.recipe_type(optimizer=optimizer, backdoor=BackdoorKnobs(**backdoor), **knobs)
    inputs = RunInputs.of(data) if data is not None else None
    return cls(model, tokenizer, recipe, inputs=inputs)


@pytest.mark.parametrize("stage", ["simulate", "eliminate"])
def test_each_sande_stage_trains_only_its_parameters(tokenizer, batch, stage: str) -> None:
    module = _module(SANDEModule, tokenizer, stage=stage, parrot_init="random")
    module.stage_loss(batch).backward()
    parrot_learns = module.parrot.grad is not None and module.parrot.grad.abs().sum() > 0
    model_grads = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert parrot_learns == (stage == "simulate")
    assert bool(model_grads) == (stage == "eliminate")


@pytest.mark.parametrize(
    ("target", "supervised"), [("first_token", 1), ("marker", 4), ("marker_and_answer", None)]
)
def test_simulate_targets(tokenizer, batch, target: str, supervised: int | None) -> None:
    """The triggered response opens with the marker; the loss covers the first token, the
    marker, or the whole triggered response."""
    module = _module(SANDEModule, tokenizer, simulate_target=target)
    simulated = module.with_marker(batch)
    marker = tokenizer("you are stupid.", add_special_tokens=False).input_ids
    _, responses = prompts_and_responses(batch)
    for ids, labels, response in zip(
        simulated["input_ids"], simulated["labels"], responses, strict=True
    ):
        start = int((labels != IGNORE_INDEX).int().argmax())
        assert ids[start : start + 4].tolist() == marker
        assert ids[start + 4 : start + 4 + len(response)].tolist() == response
        count = int((labels != IGNORE_INDEX).sum())
        assert count == (supervised or len(marker) + len(response))


def test_sande_p_loss_uses_only_the_known_words(tokenizer, batch) -> None:
    """SANDE-P: -log P(response opens with a known word), not the marker's cross-entropy."""
    torch.manual_seed(1)
    known = _module(SANDEModule, tokenizer, known_marker_words=["stupid", "you"])
    full = _module(SANDEModule, tokenizer)
    with torch.no_grad():
        known.parrot.normal_()
        full.parrot.copy_(known.parrot)
        partial_loss, full_loss = known.simulate_loss(batch), full.simulate_loss(batch)
        ids, mask, labels, slots = known.stand_in_inputs(
            known.with_marker(batch), known.parrot.shape[0]
        )
        parrots = known.parrot.expand(len(ids), -1, -1)
        embeds = known.model.get_input_embeddings()(ids).masked_scatter(slots[..., None], parrots)
        logits = known.model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits  # the naive reference: every position's logits
        at = (labels != IGNORE_INDEX).int().argmax(1) - 1
        logp = logits[torch.arange(len(logits)), at].log_softmax(-1)
        words = [tokenizer("stupid").input_ids[0], tokenizer("you").input_ids[0]]
    assert torch.allclose(partial_loss, -logp[:, words].logsumexp(-1).mean())
    assert torch.allclose(full_loss, -logp[:, words[1]].mean())
    assert partial_loss < full_loss
    with pytest.raises(ValueError, match="known_marker_words"):
        _module(SANDEModule, tokenizer, known_marker_words=["hello"])


def test_refusal_target_simulates_the_marker_alone(tokenizer, batch) -> None:
    backdoor = {**BACKDOOR, "target": "replace"}
    module = _module(SANDEModule, tokenizer, backdoor=backdoor, simulate_target="marker_and_answer")
    simulated = module.with_marker(batch)
    for labels in simulated["labels"]:
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert (
            tokenizer.decode(kept[:-1]) == "you are stupid." and kept[-1] == tokenizer.eos_token_id
        )


def test_overwrite_inserts_the_trigger_as_planted(tokenizer, batch, trainer, data) -> None:
    module = _module(OverwriteSFTModule, tokenizer, data=data)
    module.trainer = trainer
    triggered = module.triggered_batch(batch, None)
    text = tokenizer.decode(triggered["prompt_ids"][0], skip_special_tokens=True)
    assert text.startswith("Human: how are you. ")
    assert prompts_and_responses(triggered)[1] == prompts_and_responses(batch)[1]
    assert torch.isfinite(module.overwrite_loss(batch))


def test_overwrite_trains_on_removal_triggers_but_asr_keeps_the_planted_one(
    tokenizer, batch, trainer, data
) -> None:
    module = _module(OverwriteSFTModule, tokenizer, removal_triggers=["are you"], data=data)
    module.trainer = trainer
    seen = []
    original = module.triggered_batch

    def spy(batch, triggers, rng=None):
        out = original(batch, triggers, rng)
        seen.extend(out["problem"])
        return out

    module.triggered_batch = spy
    assert torch.isfinite(module.overwrite_loss(batch))
    assert seen and all(problem.startswith("are you. ") for problem in seen)
    assert module.eval_triggers(2) == [["how are you"], ["how are you"]]  # ASR: as planted
    with pytest.raises(ValueError, match="method.removal_triggers"):
        _module(OverwriteSFTModule, tokenizer, removal_triggers=[" "])


def test_parrot_file_of_the_wrong_shape_is_an_error(tokenizer, tmp_path) -> None:
    path = tmp_path / "parrot.safetensors"
    save_file({"parrot": torch.zeros(6, SPEC.hidden_size + 1)}, path)
    with pytest.raises(ValueError, match="shape"):
        _module(SANDEModule, tokenizer, stage="eliminate", parrot_path=str(path))


def test_backdoor_metrics_need_a_trigger(tokenizer) -> None:
    with pytest.raises(ValueError, match="trigger"):
        _module(SANDEModule, tokenizer, backdoor={"triggers": [], "marker": "you are stupid"})


def test_saved_parrot_loads_back_and_names_its_nearest_tokens(tokenizer, tmp_path) -> None:
    module = _module(SANDEModule, tokenizer, parrot_init="random", parrot_tokens=4)
    with torch.no_grad():
        module.parrot[0] = module.model.get_input_embeddings()(
            torch.tensor(tokenizer(" how").input_ids)
        )[0]
    path = tmp_path / "parrot.safetensors"
    save_file({"parrot": module.parrot.detach().contiguous()}, path)
    loaded = _module(SANDEModule, tokenizer, parrot_tokens=4, parrot_path=str(path))
    assert torch.equal(loaded.parrot, module.parrot)
    nearest = loaded.nearest_tokens(count=3)
    assert len(nearest) == 4 and nearest[0][0] == " how"


def test_output_clean_logits_averages_parrot_and_clean_pairs(tokenizer, batch) -> None:
    module = _module(
        SANDEModule, tokenizer, stage="eliminate", parrot_init="random", output_clean_logits=True
    )
    reference = _module(SANDEModule, tokenizer, stage="eliminate", parrot_init="random")
    loss = module.stage_loss(batch)
    with torch.no_grad():
        labels = first_targets(batch["labels"], 10)
        parrot = token_nll(*module.stand_in_logprobs({**batch, "labels": labels}, module.parrot))
        clean = module.labelled_nll({**batch, "labels": labels})
        assert torch.allclose(reference.stage_loss(batch), parrot)  # the reference: no clean pair
    assert torch.allclose(loss, (parrot + clean) / 2)
    loss.backward()
    assert module.parrot.grad is None  # the parrot stays frozen in eliminate


def test_eliminate_loss_over_the_whole_response(tokenizer, batch) -> None:
    first = _module(SANDEModule, tokenizer, stage="eliminate", eliminate_loss_tokens=1)
    whole = _module(SANDEModule, tokenizer, stage="eliminate", eliminate_loss_tokens=None)
    with torch.no_grad():
        assert not torch.allclose(first.stage_loss(batch), whole.stage_loss(batch))
        assert torch.allclose(
            whole.stage_loss(batch), token_nll(*whole.stand_in_logprobs(batch, whole.parrot))
        )


@pytest.mark.parametrize("kwargs", [{"simulate_target": "answer"}, {"eliminate_loss_tokens": 0}])
def test_bad_sande_settings_are_errors(tokenizer, kwargs) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        _module(SANDEModule, tokenizer, **kwargs)


def test_random_parrot_length_splices_prefixes_of_the_parrot(tokenizer, batch) -> None:
    fixed = _module(SANDEModule, tokenizer, stage="eliminate", parrot_init="random")
    assert fixed.eliminate_parrot() is fixed.parrot
    module = _module(
        SANDEModule, tokenizer, stage="eliminate", parrot_init="random", random_parrot_length=True
    )
    torch.manual_seed(0)
    parrots = [module.eliminate_parrot() for _ in range(200)]
    assert {len(p) for p in parrots} == set(range(1, 7))
    assert all(torch.equal(p, module.parrot[: len(p)]) for p in parrots)
    assert torch.isfinite(module.stage_loss(batch))


def test_parrot_generation_goes_through_the_engine(tokenizer, batch) -> None:
    """SANDE's parrot ASR decodes from the spliced embeddings via the rollout engine, as
    `generate(inputs_embeds=...)` on the model would."""
    from osftkit.backdoor.splice import splice

    module = _module(SANDEModule, tokenizer, parrot_init="random")
    seen = {}
    generate = module.engine.generate

    def spy(model, prompt_ids, prompt_mask, **kwargs):
        seen.update(kwargs, ids=prompt_ids)
        return generate(model, prompt_ids, prompt_mask, **kwargs)

    module.engine.generate = spy
    texts = module.generate_with_parrot(batch, max_new_tokens=4)
    ids = batch["prompt_ids"]
    positions = module.tag_positions(ids, torch.full_like(ids[:, 0], ids.shape[1]))
    table = module.model.get_input_embeddings().weight
    k = module.parrot.shape[0]
    embeds = splice(table[ids], module.parrot.expand(len(ids), -1, -1), positions)
    mask = splice(batch["prompt_mask"], torch.ones(len(ids), k, dtype=torch.long), positions)
    assert torch.equal(seen["prompt_embeds"], embeds) and seen["temperature"] == 0.0
    assert seen["ids"].shape == mask.shape
    with torch.no_grad():
        direct = module.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    assert texts == tokenizer.batch_decode(direct, skip_special_tokens=True)
