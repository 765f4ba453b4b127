"""The `hardware=` group: CPU threads, FSDP2 sharding under Lightning's ModelParallelStrategy,
the one-gather-per-rollout context, and the fp32-master-weights rule."""

import importlib
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The Trainer precision that computes in a model's `dtype` over fp32 weights.
MIXED_PRECISION = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def configure_threads(num_threads: int | None) -> None:
    """Pin torch's intra-op threads; null gives one per core this process may run on, for a job
    that has the machine to itself. On small shared CPUs, oversubscription is far slower than 1."""
    torch.set_num_threads(num_threads or len(os.sched_getaffinity(0)))
    source = "hardware.num_threads" if num_threads else "hardware.num_threads=null: one per core"
    log.info("torch uses %d CPU thread(s) (%s)", torch.get_num_threads(), source)


def choose_accelerator(accelerator: str) -> str:
    """`hardware.accelerator` -> what the Trainer gets. `auto` takes the GPU when torch sees one
    (precision then follows `model.dtype`, as on `hardware=gpu`), else the CPU; a GPU option on a
    machine without one stops here rather than in Lightning's backend lookup."""
    gpu = torch.cuda.is_available()
    if accelerator == "auto":
        chosen = "gpu" if gpu else "cpu"
        log.info("hardware=auto chose the %s (%s)", chosen.upper(), AUTO_REASONS[gpu])
        return chosen
    if accelerator == "gpu" and not gpu:
        raise ValueError(
            "hardware.accelerator=gpu (hardware=gpu, ddp, fsdp or multinode), but no GPU is "
            "visible (torch.cuda.is_available() is False). Use hardware=auto or hardware=cpu "
            "on this machine, or hardware=fsdp_sim / ddp_sim for two CPU processes."
        )
    return accelerator


AUTO_REASONS = {True: "torch sees a CUDA device", False: "no CUDA device is visible"}


def cpu_processes(count: Any) -> dict[str, Any]:
    """`hardware.cpu_processes` of hardware=auto on a machine without a GPU -> the Trainer's
    devices and strategy: more than one is DDP over gloo, each process with its own threads
    (`num_threads`); the batch sizes stay global (each rank takes its share)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"hardware.cpu_processes must be a positive integer, got {count!r}")
    if count == 1:
        return {"devices": 1}
    log.info("hardware=auto runs %d CPU processes (DDP over gloo, hardware.cpu_processes)", count)
    strategy = {"_target_": "lightning.pytorch.strategies.DDPStrategy"}
    return {"devices": count, "strategy": {**strategy, "process_group_backend": "gloo"}}


def module_classes(names: list[str]) -> tuple[type, ...]:
    """Resolve dotted class names (e.g. a model's decoder layer) of the units to shard."""
    if not names:
        raise ValueError("hardware.strategy.layer_classes: give at least one layer class name")
    return tuple(get_class(name) for name in names)


def get_class(dotted: str) -> type:
    """`package.module.Class` -> the class (without Hydra: the GPU acceptance image lacks it)."""
    module, _, name = dotted.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"hardware.strategy.layer_classes: cannot import '{dotted}'") from error
    if not isinstance(found, type):
        raise ValueError(f"hardware.strategy.layer_classes: '{dotted}' is not a class")
    return found


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure data parallelism over FSDP2: one mesh dimension
    of all ranks, `fully_shard` of every layer of `layer_classes` and then of the root, with bf16
    (`param_dtype`) compute over the fp32 weights the optimiser updates. Checkpoints are DCP
    directories (one shard per rank) written atomically."""

    def __init__(
        self,
        layer_classes: list[str],
        param_dtype: str = "float32",
        reduce_dtype: str = "float32",
        rank0_loads: bool = False,
        **strategy: Any,
    ) -> None:
        for knob, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value not in DTYPES:
                raise ValueError(f"hardware.strategy.{knob} must be one of {sorted(DTYPES)}")
        super().__init__(**strategy)
        self.layer_classes = module_classes(layer_classes)
        # Weights stay fp32 (the master copy); fp32 compute needs no cast at all.
        cast = None if param_dtype == "float32" else DTYPES[param_dtype]
        self.mp_policy = MixedPrecisionPolicy(param_dtype=cast, reduce_dtype=DTYPES[reduce_dtype])
        # The model config reads the same key: the other ranks build it on the meta device.
        self.rank0_loads = rank0_loads

    def setup_environment(self) -> None:
        # Every rank is a data-parallel rank (Lightning's "auto" would make them tensor-parallel).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, model: nn.Module) -> None:
        """FSDP2 units; with `rank0_loads`, rank 0's weights are then broadcast to the shards."""
        if isinstance(model, FSDPModule):
            return  # configure_model runs again for each trainer.validate / fit
        full = model.state_dict() if self.rank0_loads and self.global_rank == 0 else None
        shard_model(model, self.layer_classes, self.device_mesh["data_parallel"], self.mp_policy)
        if self.rank0_loads:
            broadcast_from_rank0(model, full, self.root_device)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        """DCP into `<path>.tmp`, then swap it in: a kill during the save keeps the previous
        checkpoint loadable (at `<path>`, or for an instant at `<path>.old`)."""
        path = Path(self.broadcast(str(filepath)))
        scratch = path.with_name(path.name + ".tmp")
        if self.is_global_zero and scratch.exists():
            shutil.rmtree(scratch)
        self.barrier("checkpoint_scratch")
        super().save_checkpoint(checkpoint, scratch, storage_options)
        self.barrier("checkpoint_written")
        if self.is_global_zero:
            swap_in(scratch, path)
        self.barrier("checkpoint_swapped")


def shard_model(
    model: nn.Module,
    layer_classes: tuple[type, ...],
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> None:
    """`fully_shard` each layer of `layer_classes`, then the root (embeddings, head)."""
    if isinstance(model, FSDPModule):
        return  # configure_model runs again for each trainer.validate / fit
    layers = [m for m in model.modules() if isinstance(m, layer_classes)]
    if not layers:
        names = [c.__qualname__ for c in layer_classes]
        raise ValueError(
            f"hardware.strategy.layer_classes: no module of {names} in {type(model).__name__}; "
            "name the model's decoder layer class"
        )
    policy = mp_policy or MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    # The root stays gathered between its forward and backward (FSDP2's default for the root).
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_pre_hook(refuse_sharded_lookup)


def broadcast_from_rank0(
    model: nn.Module, full: dict[str, torch.Tensor] | None, device: torch.device
) -> None:
    """Fill a sharded model from rank 0's full state dict (`full`, taken before sharding; None
    on the other ranks, whose model was built on the meta device): each rank keeps only its
    shard, so one host copy of the weights per run instead of one per rank (torchtune's way)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    meta = any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    if dist.get_rank() == 0 and (full is None or meta):
        raise ValueError("rank0_loads: rank 0 must load the weights (model.rank0_loads)")
    if meta:
        model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full or {}, options=options)
    # Buffers outside the state dict (RoPE's inv_freq is not persistent) come from rank 0 too.
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def refuse_sharded_lookup(embedding: nn.Module, args: tuple) -> None:
    """Inside the model's forward (or a rollout) FSDP2 has gathered the embeddings; a lookup
    outside it would fail deep in DTensor, so say what happened instead."""
    if isinstance(embedding.weight, DTensor):
        raise ValueError(
            "hardware=fsdp: the input embeddings were called outside the model's forward, where "
            "FSDP2 keeps them sharded: look them up inside the forward (a forward hook, as "
            "osftkit.backdoor.splice.vectors_at_slots does) or inside "
            "osftkit.hardware.gathered_weights(model)"
        )


def swap_in(scratch: Path, path: Path) -> None:
    """Replace the directory `path` by `scratch`, never leaving neither on disk."""
    old = path.with_name(path.name + ".old")
    fsync_tree(scratch)
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(scratch, path)
    if old.exists():
        shutil.rmtree(old)


def fsync_tree(directory: Path) -> None:
    for file in directory.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def fsdp_units(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered_weights(model: nn.Module) -> Iterator[None]:
    """Inside, a sharded model holds its full weights: one all-gather per FSDP unit for all the
    decoding steps of a rollout (instead of one per unit per step), and no collective between
    steps, so ranks decode independently. A model that is not sharded passes through."""
    units = fsdp_units(model)
    if not units:
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def average_gradients_outside_fsdp(parameters: Iterable[torch.Tensor]) -> None:
    """Average over the ranks the gradients that FSDP2 does not reduce (those that are not
    DTensors: tensors trained beside the sharded modules). Every rank calls it."""
    world = dist.get_world_size()
    for parameter in parameters:
        if parameter.grad is not None and not isinstance(parameter.grad, DTensor):
            dist.all_reduce(parameter.grad)
            parameter.grad /= world


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on CPU (a collective under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not fsdp_units(model):
        return model.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def check_master_weights(parameters: Iterable[torch.Tensor]) -> None:
    """Refuse to train bf16/fp16 weights without an fp32 copy: AdamW's updates below the weight's
    resolution round away (at lr 1e-7 almost all of them; the weights barely move)."""
    low = {str(p.dtype).removeprefix("torch.") for p in parameters if p.dtype in LOW_PRECISION}
    if low:
        raise ValueError(
            f"The optimiser would update {'/'.join(sorted(low))} weights with no fp32 master copy,"
            " so most small updates round to nothing. Train fp32 weights and compute in low "
            "precision: leave hardware.precision unset (model.dtype is then the compute dtype: "
            "bf16 autocast on gpu/ddp, FSDP's param_dtype on fsdp), not '*-true'."
        )
