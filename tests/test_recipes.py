"""Typed recipes: every method YAML composes onto its dataclass; a wrong key or type fails at
composition naming the key; the knobs print with their documentation."""

import dataclasses

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from osftkit.recipes import SCHEMAS, Anneal, DynamicSampling, GRPORecipe, OSFTRecipe
from osftkit.recipes.__main__ import main as print_knobs
from osftkit.recipes.fields import doc_of
from tests.conftest import cli, compose_config

METHODS = ["sft", "osft", "osft_offline", "em_ft", "grpo", "dr_grpo", "dapo", "backdoor"]
METHODS += ["overwrite_sft", "sande", "sande_p", "sande_p_last", "crow"]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_yaml_builds_its_recipe(method: str) -> None:
    recipe = OmegaConf.to_object(compose_config([f"method={method}"]).method)
    assert isinstance(recipe, SCHEMAS.get(method, object)) or method in ("em_ft", "dr_grpo")
    assert recipe.optimizer["_target_"] == "torch.optim.AdamW"  # the shared block, once


def test_nested_blocks_become_dataclasses_and_can_be_set_from_the_command_line() -> None:
    cfg = compose_config(["method=dapo"])
    assert isinstance(OmegaConf.to_object(cfg.method).dynamic_sampling, DynamicSampling)
    cfg = compose_config(["method=osft", "method.anneal={epochs: 2, schedule: cosine}"])
    assert OmegaConf.to_object(cfg.method).anneal == Anneal(epochs=2, schedule="cosine")


def test_a_misspelt_key_in_an_experiment_fails_at_composition(tmp_path) -> None:
    (tmp_path / "experiment").mkdir()
    typo = "# @package _global_\nmethod:\n  tau_smaple: 0.5\n"
    (tmp_path / "experiment" / "typo.yaml").write_text(typo)
    with pytest.raises(ConfigCompositionException, match="tau_smaple"):
        compose_config([f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo"])


def test_an_ill_typed_key_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["method=osft", "method.tau_sample=hot"])
    assert "tau_sample" in str(error.value) + str(error.value.__cause__)


def test_a_bad_nested_block_names_its_knob() -> None:
    with pytest.raises(ValueError, match="method.anneal"):
        OSFTRecipe(anneal={"epochs": 2, "shape": "linear"})
    with pytest.raises(ValueError, match="clip_eps"):
        GRPORecipe(clip_eps=0.0)


def test_the_cli_reports_an_ill_typed_key_in_one_message(tmp_path) -> None:
    result = cli("method.tau_sample=hot", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "method.tau_sample" in result.stderr and "Traceback" not in result.stderr


def test_every_knob_is_documented(capsys) -> None:
    for recipe in SCHEMAS.values():
        undocumented = [f.name for f in dataclasses.fields(recipe) if not doc_of(f)]
        assert not undocumented, (recipe.__name__, undocumented)
    assert print_knobs(["grpo"]) == 0
    assert "clip_eps_high" in capsys.readouterr().out
    assert print_knobs(["nope"]) == 1
