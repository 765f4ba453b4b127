"""Planting: SFT on poisoned data with the backdoor metrics (also the plain-SFT baseline)."""

from osftkit.backdoor.backdoor_module import BackdoorModule
from osftkit.methods.sft import SFTModule
from osftkit.recipes import PlantingRecipe


class BackdoorSFTModule(SFTModule, BackdoorModule):
    """SFT with backdoor metrics: plants a backdoor on poisoned data (`method=backdoor`), and is
    the plain-SFT baseline on clean data, which never visits the trigger."""

    recipe_type = PlantingRecipe
