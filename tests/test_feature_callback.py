"""FeatureTestCallback inside Lightning fits and inside `train.run` for every feature experiment."""

import functools

import lightning as L
import pytest
import torch
from conftest import compose_config
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from osftkit.data.digits import DigitsDataModule
from osftkit.data.features import FeatureSimulationDataModule
from osftkit.interpret.callback import FeatureTestCallback, highlighted_tokens
from osftkit.interpret.feature_test import FeatureTestInputs, FeatureTestResult
from osftkit.interpret.predictor import PredictorModule
from osftkit.models.small_nets import MLP, SmallCNN
from osftkit.train import run

torch.set_num_threads(1)


def fit(module, datamodule, callback, tmp_path, steps: int = 30) -> None:
    trainer = L.Trainer(
        max_steps=steps,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        logger=TensorBoardLogger(tmp_path, name="tb", version=""),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule)


def tags(tmp_path) -> dict:
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    return events.Tags()


def test_irt_callback_on_the_simulation(tmp_path):
    datamodule = FeatureSimulationDataModule(num_train=2048, num_val=64, batch_size=64)
    optimizer = functools.partial(torch.optim.AdamW, lr=3e-3)
    module = PredictorModule(MLP(25), optimizer, "regression", datamodule.feature_mask)
    callback = FeatureTestCallback(
        test="irt",
        alpha=0.2,
        num_draws=20,
        data=datamodule,
        captum_methods=["integrated_gradients", "feature_ablation"],
    )
    fit(module, datamodule, callback, tmp_path)
    result, metrics = callback.last_result, callback.last_metrics
    assert result.pvalues.shape == (64, 25) and result.model_calls == 64 * (1 + 25 * 20)
    assert set(metrics) == {
        "feature_test/discoveries",
        "feature_test/fdr",
        "feature_test/tpr",
        "feature_test/integrated_gradients_tpr_at_fdr",
        "feature_test/feature_ablation_tpr_at_fdr",
        "feature_test/null_floor_fraction",
        "feature_test/calibration_pvalue",
    }
    assert metrics["feature_test/discoveries"] > 0 and metrics["feature_test/tpr"] > 0
    assert metrics["feature_test/calibration_pvalue"] > 0.01  # the exact null passes
    logged = tags(tmp_path)
    assert {"feature_test/fdr", "feature_test/tpr"} <= set(logged["scalars"])
    assert "feature_test/null_pvalues" in logged["histograms"]
    assert "feature_test/fdr_tpr_curve" in logged["images"]
    assert "feature_test/fdr_tpr" in logged["tensors"]  # the PR curve: precision = 1 - FDR


def test_highlighted_tokens_are_escaped_and_cover_spans():
    inputs = torch.tensor([[0, 1, 2]])
    masks = torch.tensor([[True, True, False], [False, False, True]])
    test = FeatureTestInputs(
        inputs, lambda x, _: x.sum(-1).float(), masks, token_strings=["*a", "<b>", "c"]
    )
    result = FeatureTestResult(torch.zeros(1, 2), torch.tensor([[True, False]]), None, 0.0, 0)
    assert highlighted_tokens(test, result) == "**\\*a** **\\<b\\>** c"


def test_one_shot_callback_draws_digit_heatmaps(tmp_path):
    datamodule = DigitsDataModule(batch_size=32)
    optimizer = functools.partial(torch.optim.AdamW, lr=3e-3)
    module = PredictorModule(SmallCNN(), optimizer, "classification", datamodule.feature_mask)
    callback = FeatureTestCallback(alpha=0.3, two_sided=True, at="fit_end", data=datamodule)
    fit(module, datamodule, callback, tmp_path, steps=10)
    assert callback.last_result.statistics.shape == (32, 16)
    assert "feature_test/patches" in tags(tmp_path)["images"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.2}, r"alpha must lie in \(0, 1\)"),
        ({"num_draws": 0}, "must be at least 1"),
        ({"every_n_validations": 0}, "must be at least 1"),
        ({"test": "lime"}, "test must be one_shot"),
        ({"captum_methods": ["gradcam"]}, "unknown captum methods"),
    ],
)
def test_callback_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeatureTestCallback(**kwargs)


SHORT = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "callbacks.feature_test.every_n_validations=2",
]


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=feature_simulation", "data.num_train=512", "data.num_val=32"],
        [
            "experiment=feature_correlated",
            "data.num_train=512",
            "data.num_val=32",
            "callbacks.feature_test.test=irt",
        ],
        ["experiment=feature_digits", "data.batch_size=16"],
        ["experiment=feature_sentences", "data.num_train=256", "data.num_val=16"],
    ],
)
def test_train_run_with_the_feature_test(overrides, tmp_path):
    cfg = compose_config([*overrides, *SHORT, "hardware.num_threads=1"], tmp_path)
    metrics = run(cfg)
    assert "val/loss" in metrics
    scalars = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    scalars.Reload()
    assert "feature_test/discoveries" in scalars.Tags()["scalars"]


def test_callback_needs_the_protocol():
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=1,
        callbacks=[FeatureTestCallback(at="fit_end")],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(TypeError, match="has no feature_test_inputs"):
        trainer.fit(BoringModel())


def test_callback_without_a_sampler_or_data_says_so(tmp_path):
    datamodule = FeatureSimulationDataModule(num_train=128, num_val=16, batch_size=16)
    optimizer = functools.partial(torch.optim.AdamW, lr=3e-3)
    module = PredictorModule(MLP(25), optimizer, "regression", datamodule.feature_mask)
    with pytest.raises(ValueError, match="needs a counterfactual sampler"):
        fit(module, datamodule, FeatureTestCallback(at="fit_end"), tmp_path, steps=2)


def test_a_predictor_without_a_feature_mask_says_so():
    module = PredictorModule(MLP(25), functools.partial(torch.optim.AdamW), "regression")
    with pytest.raises(ValueError, match="not handed a feature_mask"):
        module.feature_test_inputs((torch.zeros(2, 25),))
    with pytest.raises(ValueError, match="task must be regression or classification"):
        PredictorModule(MLP(25), functools.partial(torch.optim.AdamW), "ranking")
