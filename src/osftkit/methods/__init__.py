"""LightningModules of the kit's LM methods."""

from osftkit.methods.base import CausalLMModule, ValidationSettings
from osftkit.methods.em_ft import EMFTModule
from osftkit.methods.grpo import GRPOModule, group_advantages
from osftkit.methods.osft import OSFTModule
from osftkit.methods.osft_offline import OfflineOSFTModule
from osftkit.methods.sft import SFTModule

__all__ = [
    "CausalLMModule",
    "EMFTModule",
    "GRPOModule",
    "OSFTModule",
    "OfflineOSFTModule",
    "SFTModule",
    "ValidationSettings",
    "group_advantages",
]
