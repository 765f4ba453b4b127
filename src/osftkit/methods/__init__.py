"""LightningModules of the kit's LM methods."""

from osftkit.methods.base import CausalLMModule, ValidationSettings
from osftkit.methods.grpo import GRPOModule, group_advantages
from osftkit.methods.osft import OSFTModule
from osftkit.methods.sft import SFTModule

__all__ = [
    "CausalLMModule",
    "GRPOModule",
    "OSFTModule",
    "SFTModule",
    "ValidationSettings",
    "group_advantages",
]
