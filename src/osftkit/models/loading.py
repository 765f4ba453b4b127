"""Load a causal LM and its tokenizer: hub id, local directory, or a model the kit builds."""

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from filelock import FileLock
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from osftkit.models.tiny import TinyQwen2Spec, save_tiny

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """What a `model=` config instantiates to: a network and, for language models, its tokenizer."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase | None = None


class ModelNotFoundError(RuntimeError):
    """A model path that is neither a local directory nor a reachable hub id."""


HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _offline_message(path: str, error: Exception) -> str:
    return (
        f"Could not load model '{path}': it is not a local directory and the hub could not be "
        f"reached ({type(error).__name__}). Either pre-download it on a machine with network "
        f"access (`huggingface-cli download {path} --local-dir /some/dir`) and run with "
        f"model.path=/some/dir, or use the offline default model=tiny."
    )


def hub_access(location: str) -> dict[str, Any]:
    """`from_pretrained` kwargs for `location`: a hub id whose hub does not answer one quick
    connection is read from the local cache only, so an offline machine fails at once (the hub
    client would retry five times with back-off, about a minute) or loads what is cached."""
    from huggingface_hub import constants

    if Path(location).expanduser().exists() or constants.HF_HUB_OFFLINE or _proxied():
        return {}  # a local dir; the hub client's own offline mode; a proxy we cannot probe
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_S).close()
    except OSError:
        log.warning("%s does not answer: '%s' from the local cache only", endpoint.netloc, location)
        return {"local_files_only": True}
    return {}


HUB_PROBE_S = 5.0  # seconds one connection to the hub may take before it counts as offline


def _proxied() -> bool:
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def build_once(directory: Path, build: Callable[[Path], None], what: str) -> Path:
    """Build `directory` with `build` unless it exists; atomic and safe when runs race."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        if (directory / "config.json").exists():
            return directory
        log.info("Building %s at %s (once; later runs reuse it)", what, directory)
        scratch = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
        try:
            build(scratch)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(scratch, directory)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return directory


def resolve_path(
    path: str | None,
    cache_dir: str | None = None,
    tiny: TinyQwen2Spec | dict | None = None,
    build_with: list[str] | None = None,
) -> str:
    """A config's model location -> a path `from_pretrained` reads. It builds only the tiny
    offline model (an init, no training); a `build_with` model is built by the entry point."""
    if tiny is not None:
        spec = tiny if isinstance(tiny, TinyQwen2Spec) else TinyQwen2Spec(**tiny)
        directory = Path(path) if path else Path(cache_dir) / spec.cache_name()
        return str(build_once(directory, lambda d: save_tiny(spec, d), "the tiny offline model"))
    if path is None:
        raise ValueError("model.path is required (a hub id or a local directory)")
    if build_with is not None and not (Path(path) / "config.json").exists():
        recipe = " ".join(build_with)
        raise ModelNotFoundError(
            f"Model '{Path(path).name}' is not built yet ({path}). Build it with "
            f"`python train.py {recipe}`, or let train.py / eval.py build it: they build a "
            "missing model that names `build_with` before loading it."
        )
    local = Path(path).expanduser()
    if local.exists():
        return str(local)
    if not HUB_ID.match(path):
        raise ModelNotFoundError(
            f"Local model directory '{path}' does not exist. Point model.path to a directory "
            f"written by save_pretrained, or use a hub id (org/name) on a machine with network."
        )
    return path


# What `from_pretrained` needs in a local directory: the model config, and tokenizer files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_dir(location: str) -> None:
    """A local directory must hold what save_pretrained writes (else transformers fails later
    with a tokenizer-conversion error that does not name the directory)."""
    local = Path(location).expanduser()
    if not local.is_dir():
        return
    present = sorted(p.name for p in local.iterdir())
    if "config.json" not in present or not set(TOKENIZER_FILES) & set(present):
        raise ModelNotFoundError(
            f"model.path '{location}' holds no model: expected the files save_pretrained "
            f"writes, config.json, weights (*.safetensors) and tokenizer files (one of "
            f"{', '.join(TOKENIZER_FILES)}); found {present[:10] or 'nothing'}."
        )


def load_causal_lm(
    path: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    lora: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    tiny: dict | None = None,
    build_with: list[str] | None = None,
    gradient_checkpointing: bool = False,
    rank0_loads: bool = False,
) -> LoadedModel:
    """Load model and tokenizer with `from_pretrained`; optionally wrap the model with LoRA.

    `gradient_checkpointing` recomputes each decoder layer in backward instead of keeping its
    activations (transformers' own, non-reentrant, so it works with LoRA and every strategy).
    `rank0_loads` (hardware=fsdp's strategy key): a process launched as another rank builds the
    model on the meta device; the strategy broadcasts rank 0's weights into the shards.
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got '{dtype}'")
    location = resolve_path(path, cache_dir, tiny, build_with)
    check_model_dir(location)
    access = hub_access(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            location, trust_remote_code=trust_remote_code, **access
        )
        if rank0_loads and lora is None and launched_rank() != 0:
            model = empty_model(location, DTYPES[dtype], trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **access
            )
    except OSError as error:
        raise ModelNotFoundError(_offline_message(location, error)) from error
    _ensure_pad_token(tokenizer, model)
    if gradient_checkpointing:
        enable_checkpointing(model)
    if lora is not None:
        model = _wrap_lora(model, lora)
    return LoadedModel(model=model, tokenizer=tokenizer)


RANK_VARIABLES = ("RANK", "NODE_RANK", "LOCAL_RANK", "SLURM_PROCID")


def launched_rank() -> int:
    """0 in the process that is (or will be) global rank 0, else a positive number: torchrun,
    SLURM and Lightning's launcher say it in the environment before any process group exists."""
    return max(int(os.environ.get(name) or 0) for name in RANK_VARIABLES)


def empty_model(location: str, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model of `location` on the meta device (no memory), with its generation config."""
    from transformers import AutoConfig, GenerationConfig

    log.info("rank %d builds the model on the meta device (rank 0 loads it)", launched_rank())
    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    # Without a generation_config.json: from_config's defaults, as from_pretrained has them.
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(location)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of each decoder layer: transformers >= 5.23 names
    it `activation_checkpointing_enable`, the releases before (vllm 0.33.0 needs < 5.21)
    `gradient_checkpointing_enable`, with the same kwargs."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> None:
    """Batched generation needs a pad token; fall back to EOS (documented) rather than fail."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has neither a pad nor an EOS token: cannot batch.")
        log.warning("Tokenizer has no pad token: using EOS '%s' as pad", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def _wrap_lora(model: nn.Module, lora: dict[str, Any]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
