"""The rollout/trainer agreement guard: its figures, its one warning, and the engines' reports."""

import logging

import pytest
import torch

from osftkit.models.logprobs import token_logprobs
from osftkit.rollout import HFGenerateEngine, PagedEngine
from osftkit.rollout.agreement import AgreementGuard, agreement, response_logprobs


def test_agreement_figures_over_the_masked_tokens():
    engine = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    trainer = torch.tensor([[-1.0, -1.5, 0.0], [-0.5, -1.0, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    figures = agreement(engine, trainer, mask)
    # masked differences: 0, 0.5, 0, -0.5, 0 -> mean |d| = 0.2; ratios e^0.5 and e^-0.5
    assert figures["rollout/logprob_diff"].item() == pytest.approx(0.2)
    assert figures["rollout/ratio_max"].item() == pytest.approx(torch.e**0.5)
    assert figures["rollout/ratio_min"].item() == pytest.approx(torch.e**-0.5)


def test_agreement_of_nothing_is_perfect():
    figures = agreement(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1, 2))
    assert figures["rollout/logprob_diff"].item() == 0
    assert figures["rollout/ratio_max"].item() == 1


def test_the_guard_warns_once_and_not_under_top_p(caplog):
    guard = AgreementGuard(threshold=0.1)
    far, near, mask = torch.zeros(1, 2), torch.full((1, 2), -0.05), torch.ones(1, 2)
    with caplog.at_level(logging.WARNING, logger="osftkit.rollout.agreement"):
        guard.check(near, far, mask, 1.0, step=0)
        assert not caplog.records
        guard.check(far - 1, far, mask, 0.9, step=1)  # top-p renormalises: not judged
        assert not caplog.records
        guard.check(far - 1, far, mask, 1.0, step=2)
        guard.check(far - 1, far, mask, 1.0, step=3)
    assert len(caplog.records) == 1
    assert "stale engine weights" in caplog.text and "temperature" in caplog.text


def trainer_logprobs(model, rollouts, temperature):
    logp, _ = token_logprobs(
        model,
        input_ids=rollouts.sequences,
        attention_mask=rollouts.attention_mask,
        score_mask=rollouts.loss_mask,
        temperature=temperature,
        with_entropy=False,
    )
    return response_logprobs(logp, rollouts.prompt_ids.shape[1])


@pytest.mark.parametrize(
    "engine",
    [
        HFGenerateEngine(report_logprobs=True),
        PagedEngine({"page_size": 16, "max_batch_tokens": 256, "return_logprobs": True}),
    ],
    ids=["hf", "paged"],
)
def test_the_engines_report_the_trainers_logprobs_at_the_sampling_temperature(tiny_lm, engine):
    """What the README's figures measure: the engines' reported log-probs against the trainer's
    at tau = 0.6 (the same weights, fp32): they agree to float rounding."""
    tok = tiny_lm.tokenizer
    prompt = torch.tensor([tok("12+3\n", add_special_tokens=False)["input_ids"]] * 2)
    torch.manual_seed(0)
    rollouts = engine.generate(
        tiny_lm.model,
        prompt,
        torch.ones_like(prompt),
        num_samples=3,
        temperature=0.6,
        top_p=1.0,
        max_new_tokens=12,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    trainer = trainer_logprobs(tiny_lm.model, rollouts, 0.6)
    figures = agreement(rollouts.logprobs, trainer, rollouts.response_mask)
    print(f"{type(engine).__name__}: logprob_diff {figures['rollout/logprob_diff'].item():.3g}")
    assert figures["rollout/logprob_diff"] < 1e-4
    # at temperature 1 the trainer's log-probs are another distribution: the guard sees it
    at_one = trainer_logprobs(tiny_lm.model, rollouts, 1.0)
    wrong = agreement(rollouts.logprobs, at_one, rollouts.response_mask)
    assert wrong["rollout/logprob_diff"] > 1e-2


def test_greedy_and_unasked_rollouts_carry_no_logprobs(tiny_lm):
    tok = tiny_lm.tokenizer
    prompt = torch.tensor([tok("7\n", add_special_tokens=False)["input_ids"]])
    settings = dict(num_samples=2, top_p=1.0, max_new_tokens=4, eos_token_id=tok.eos_token_id)
    settings["pad_token_id"] = tok.pad_token_id
    mask = torch.ones_like(prompt)
    greedy = HFGenerateEngine(report_logprobs=True).generate(
        tiny_lm.model, prompt, mask, temperature=0.0, **settings
    )
    unasked = HFGenerateEngine().generate(tiny_lm.model, prompt, mask, temperature=0.7, **settings)
    assert greedy.logprobs is None and unasked.logprobs is None
    assert unasked.rows(slice(0, 1)).logprobs is None


def test_an_osft_run_logs_the_agreement_figures(fast_cfg, tmp_path):
    """The rollout's call site: with an engine that reports log-probs, every step logs them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from osftkit.train import run

    run(fast_cfg("method=osft", "engine.report_logprobs=true", "trainer.log_every_n_steps=1"))
    events = next((tmp_path / "run" / "tensorboard").rglob("events*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    diffs = [event.value for event in accumulator.Scalars("rollout/logprob_diff")]
    ratios = [event.value for event in accumulator.Scalars("rollout/ratio_max")]
    print(f"engine=hf, OSFT, 3 steps: rollout/logprob_diff {diffs}, ratio_max {ratios}")
    assert len(diffs) == 3 and max(diffs) < 1e-4 and min(ratios) >= 1.0
