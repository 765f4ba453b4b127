"""The policy's weights as an inference engine loads them: full tensors under their HF names.

Training wraps the model: FSDP2 shards every parameter as a DTensor (names unchanged),
FSDP1, activation checkpointing and torch.compile add prefixes, PEFT adds `base_model.model.`
and splits each adapted linear into `base_layer` plus `lora_A` / `lora_B`. An engine such as
vLLM loads checkpoint names (`model.layers.0.self_attn.q_proj.weight`), so the stream below
undoes all of that, one parameter at a time (never a full copy of the model).
"""

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook

# Wrapper prefixes that may occur anywhere in a parameter's dotted name.
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
PEFT_PREFIX = "base_model.model."
LORA_BASE = ".base_layer."


def full(tensor: Tensor) -> Tensor:
    """The whole tensor on this rank; a DTensor shard is all-gathered (a collective)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def hf_name(name: str) -> str:
    """The checkpoint name of a (possibly wrapped) parameter name."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    name = name.removeprefix(PEFT_PREFIX)
    return name.replace(LORA_BASE, ".")


def lora_delta(layer: nn.Module) -> Tensor:
    """scaling * B @ A summed over the active adapters of a PEFT LoRA linear, full tensors."""
    if any(layer.use_dora.get(name, False) for name in layer.active_adapters):
        raise NotImplementedError("Weight sync cannot merge DoRA adapters: use plain LoRA")
    delta = 0
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a, b = full(layer.lora_A[name].weight), full(layer.lora_B[name].weight)
        step = (b.float() @ a.float()) * layer.scaling[name]
        delta = delta + (step.T if layer.fan_in_fan_out else step)
    return delta


def is_adapter_only(name: str) -> bool:
    """LoRA factors (folded into their base weight) and PEFT's frozen copies of saved modules."""
    return ".lora_" in name or ".original_module." in name


@torch.no_grad()
def stream_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """(HF name, full tensor in `dtype`) per parameter, LoRA merged. Every rank must iterate
    it in step: each sharded parameter is gathered by a collective."""
    for name, param in model.named_parameters():
        if is_adapter_only(name):
            continue
        tensor = full(param.detach())
        if name.endswith(LORA_BASE + "weight"):  # the bias of an adapted linear is unchanged
            layer = model.get_submodule(name.split(LORA_BASE)[0])
            tensor = tensor.float() + lora_delta(layer)
        yield saved_module_name(hf_name(name)), tensor.to(dtype)


def saved_module_name(name: str) -> str:
    """PEFT `modules_to_save`: `x.modules_to_save.<adapter>.weight` is the trained `x.weight`."""
    if ".modules_to_save." not in name:
        return name
    head, tail = name.split(".modules_to_save.", 1)
    return f"{head}.{tail.split('.', 1)[1]}"


class StepCounter:
    """Optimiser steps taken in this process, by any optimiser (torch's global post-hook)."""

    count = 0

    @classmethod
    def stepped(cls, optimizer, args, kwargs) -> None:
        cls.count += 1


register_optimizer_step_post_hook(StepCounter.stepped)


LOADS = "_osftkit_weight_loads"  # load_state_dict calls seen on a model


def count_load(module: nn.Module, incompatible_keys) -> None:
    setattr(module, LOADS, getattr(module, LOADS) + 1)


def weights_version(model: nn.Module) -> tuple[int, int]:
    """Changes whenever the weights do: after any optimiser step (torch's global post-hook,
    which sees every optimiser, foreach steps on FSDP2's DTensors included) and after a
    `load_state_dict` into the model (a checkpoint restore; counted from the first call on).
    Neither parameter identities nor version counters enter: FSDP2's root swaps its
    parameters between the sharded and the unsharded (re-gathered) form around a forward,
    a no-grad validation pass included, which is no change of the weights. Code that writes
    the weights in place outside both (none in the kit) must bump `StepCounter.count`."""
    if not hasattr(model, LOADS):
        setattr(model, LOADS, 0)
        model.register_load_state_dict_post_hook(count_load)
    return StepCounter.count, getattr(model, LOADS)
