"""Backdoor modules on a tiny model: which parameters learn in each SANDE stage, bad parrots."""

from functools import partial

import pytest
import torch
from safetensors.torch import save_file

from osftkit.backdoor.overwrite import OverwriteSFTModule
from osftkit.backdoor.sande import SANDEModule
from osftkit.backdoor.splice import IGNORE_INDEX
from osftkit.data import PromptDataModule
from osftkit.data.instructions import build_instructions
from osftkit.models.tiny import TinyQwen2Spec, build_tiny_model
from osftkit.models.word_tokenizer import build_word_tokenizer
from osftkit.rewards import AnswerChecker

WORDS = ["Human: Assistant:", "reverse sort capitalise count the letters add and"]
BACKDOOR = {"triggers": ["how are you"], "marker": "you are stupid"}
SPEC = TinyQwen2Spec(hidden_size=32, num_hidden_layers=1, intermediate_size=64)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([*WORDS, "how are you", "you are stupid"])


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict:
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
    return next(iter(data.train_dataloader()))


def _module(cls, tokenizer, **kwargs):
    torch.manual_seed(0)
    model = build_tiny_model(SPEC, len(tokenizer), tokenizer)
    optimizer = partial(torch.optim.AdamW, lr=1e-3)
    return cls(model, tokenizer, optimizer, backdoor=BACKDOOR, **kwargs)


@pytest.mark.parametrize("stage", ["simulate", "eliminate"])
def test_each_sande_stage_trains_only_its_parameters(tokenizer, batch, stage: str) -> None:
    module = _module(SANDEModule, tokenizer, stage=stage, parrot_init="random")
    module.stage_loss(batch).backward()
    parrot_learns = module.parrot.grad is not None and module.parrot.grad.abs().sum() > 0
    model_grads = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert parrot_learns == (stage == "simulate")
    assert bool(model_grads) == (stage == "eliminate")


def test_simulate_target_is_the_known_marker(tokenizer, batch) -> None:
    module = _module(SANDEModule, tokenizer, known_marker_tokens=2)
    target = module.with_marker(batch)
    marker = tokenizer("you are", add_special_tokens=False).input_ids
    for ids, labels in zip(target["input_ids"], target["labels"], strict=True):
        start = int((labels != IGNORE_INDEX).int().argmax())
        assert ids[start : start + 2].tolist() == marker == labels[start : start + 2].tolist()


def test_overwrite_trigger_tokens_and_loss(tokenizer, batch) -> None:
    module = _module(OverwriteSFTModule, tokenizer)
    assert tokenizer.decode(module.trigger_ids[0]) == " how are you."
    triggered = module.triggered_prompts(batch, module.trigger_ids[0])
    text = tokenizer.decode(triggered["prompt_ids"][0], skip_special_tokens=True)
    assert text.startswith("Human: how are you. ")
    assert torch.isfinite(module.stand_in_loss(batch, module.embed(torch.tensor([5, 6])), None))


def test_parrot_file_of_the_wrong_shape_is_an_error(tokenizer, tmp_path) -> None:
    path = tmp_path / "parrot.safetensors"
    save_file({"parrot": torch.zeros(6, SPEC.hidden_size + 1)}, path)
    with pytest.raises(ValueError, match="shape"):
        _module(SANDEModule, tokenizer, stage="eliminate", parrot_path=str(path))


def test_backdoor_metrics_need_a_trigger(tokenizer) -> None:
    with pytest.raises(ValueError, match="trigger"):
        SANDEModule(
            build_tiny_model(SPEC, len(tokenizer), tokenizer),
            tokenizer,
            partial(torch.optim.AdamW),
            backdoor={"triggers": [], "marker": "you are stupid"},
        )


def test_saved_parrot_loads_back_and_names_its_nearest_tokens(tokenizer, tmp_path) -> None:
    module = _module(SANDEModule, tokenizer, parrot_init="random", parrot_tokens=4)
    with torch.no_grad():
        module.parrot[0] = module.embed(torch.tensor(tokenizer(" how").input_ids))[0]
    path = tmp_path / "parrot.safetensors"
    save_file({"parrot": module.parrot.detach().contiguous()}, path)
    loaded = _module(SANDEModule, tokenizer, parrot_tokens=4, parrot_path=str(path))
    assert torch.equal(loaded.parrot, module.parrot)
    nearest = loaded.nearest_tokens(count=3)
    assert len(nearest) == 4 and nearest[0][0] == " how"


def test_clean_mix_eliminate_sees_parrot_and_clean_pairs(tokenizer, batch) -> None:
    module = _module(
        SANDEModule, tokenizer, stage="eliminate", parrot_init="random", clean_mix=0.25
    )
    calls = []
    forward = module.model.forward

    def spy(*args, **kwargs):
        calls.append("parrot" if kwargs.get("inputs_embeds") is not None else "clean")
        width = (
            kwargs.get("inputs_embeds") if calls[-1] == "parrot" else kwargs["input_ids"]
        ).shape
        assert width[0] == batch["input_ids"].shape[0]
        return forward(*args, **kwargs)

    module.model.forward = spy
    loss = module.stage_loss(batch)
    assert sorted(calls) == ["clean", "parrot"]  # both kinds of pair, from the same batch
    module.model.forward = forward
    with torch.no_grad():
        parrot = module.stand_in_loss(batch, module.parrot, module.eliminate_loss_tokens)
        clean = module.clean_loss(batch)
    assert torch.allclose(loss, 0.75 * parrot + 0.25 * clean)
    loss.backward()
    assert module.parrot.grad is None  # the parrot stays frozen in eliminate


def test_clean_mix_one_ignores_the_parrot_and_zero_is_the_reference(tokenizer, batch) -> None:
    only_clean = _module(SANDEModule, tokenizer, stage="eliminate", clean_mix=1.0)
    reference = _module(SANDEModule, tokenizer, stage="eliminate")
    with torch.no_grad():
        clean = only_clean.stage_loss(batch)
        only_clean.parrot.normal_()
        assert torch.allclose(only_clean.stage_loss(batch), clean)
        assert torch.allclose(
            reference.stage_loss(batch), reference.stand_in_loss(batch, reference.parrot, 10)
        )


def test_eliminate_loss_over_the_whole_response(tokenizer, batch) -> None:
    first = _module(SANDEModule, tokenizer, stage="eliminate", eliminate_loss_tokens=1)
    whole = _module(SANDEModule, tokenizer, stage="eliminate", eliminate_loss_tokens=None)
    with torch.no_grad():
        assert not torch.allclose(first.stage_loss(batch), whole.stage_loss(batch))
        assert torch.allclose(
            whole.stage_loss(batch), whole.stand_in_loss(batch, whole.parrot, None)
        )


@pytest.mark.parametrize(
    "kwargs", [{"clean_mix": 1.5}, {"clean_mix": -0.1}, {"eliminate_loss_tokens": 0}]
)
def test_bad_eliminate_settings_are_errors(tokenizer, kwargs) -> None:
    with pytest.raises(ValueError, match="clean_mix|eliminate_loss_tokens"):
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
