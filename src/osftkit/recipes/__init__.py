"""Typed recipes: one documented config dataclass per method, validated where it is built.

Hydra composes `configs/method/<name>.yaml` onto the recipe's schema (registered here as
`method/schema/<name>`), so an unknown or ill-typed key fails at composition naming the key;
`OmegaConf.to_object(cfg.method)` builds the dataclass, whose `__post_init__` checks the values.
`python -m osftkit.recipes <method>` prints a method's knobs with their documentation.
This package imports no torch: registering the schemas keeps `train.py --help` fast.
"""

from hydra.core.config_store import ConfigStore

from osftkit.recipes.backdoor import (
    BackdoorKnobs,
    CROWRecipe,
    OverwriteRecipe,
    PlantingRecipe,
    SANDERecipe,
)
from osftkit.recipes.grpo import DynamicSampling, GRPORecipe, OverlongBuffer
from osftkit.recipes.lm import LMRecipe, Scheduler, SFTRecipe
from osftkit.recipes.osft import Anneal, OfflineOSFTRecipe, OSFTRecipe
from osftkit.recipes.rollout import RolloutRecipe

# The schema of each method YAML that starts a family (the others inherit it by `defaults`).
SCHEMAS: dict[str, type[LMRecipe]] = {
    "sft": SFTRecipe,
    "osft": OSFTRecipe,
    "osft_offline": OfflineOSFTRecipe,
    "grpo": GRPORecipe,
    "backdoor": PlantingRecipe,
    "overwrite_sft": OverwriteRecipe,
    "sande": SANDERecipe,
    "crow": CROWRecipe,
}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="method/schema", name=name, node=schema)


register()

__all__ = [
    "SCHEMAS",
    "Anneal",
    "BackdoorKnobs",
    "CROWRecipe",
    "DynamicSampling",
    "GRPORecipe",
    "LMRecipe",
    "OSFTRecipe",
    "OfflineOSFTRecipe",
    "OverlongBuffer",
    "OverwriteRecipe",
    "PlantingRecipe",
    "RolloutRecipe",
    "SANDERecipe",
    "SFTRecipe",
    "Scheduler",
    "register",
]
