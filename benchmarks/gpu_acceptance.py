"""GPU acceptance: the kit's scale path on one GPU, first time, no network (~5 minutes, H200).

    scripts/acceptance_carry.sh     # once, here: omegaconf + rich (pure Python) -> .carry/
    PYTHONPATH=src:.carry python benchmarks/gpu_acceptance.py          # on the GPU machine
    PYTHONPATH=src:.carry python benchmarks/gpu_acceptance.py --tiny   # CPU rehearsal

It needs only what the lent GPU image has (torch, Lightning, transformers, safetensors, numpy)
plus the two carried packages the planner reads; no Hydra, datasets or captum (it imports the
kit's rooms below the entry points). Models are built from their architecture with random
weights (no download). Prints one JSON line per part and exits 1 when a check fails:
1. an OSFT step at Qwen2.5-Math-1.5B shapes (vocabulary 151,936): a rollout at tau_s with the hf
   and the paged engine (tokens/s each), then the training step in micro-batches at tau_t = 1
   (step time; peak memory against the planner's estimate of the same step);
2. the fp32-master check: one more step at lr 1e-7 moves most fp32 weights, while a bf16 copy of
   the weights would show few of those changes;
3. FSDP2 through Lightning and the kit's FSDP2Strategy on one device, Qwen2.5-Math-7B layer
   shapes (2 layers, vocabulary 152,064, prompt 1,024 + response 3,072, gradient checkpointing):
   step time and peak memory; a DCP checkpoint saved and resumed (weights and AdamW state equal
   on resume, then a step more); the HF export read back equal.
--tiny keeps the vocabularies and shrinks the rest, so the same code runs on a CPU.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset
from transformers import (
    AutoModelForCausalLM,
    ContinuousBatchingConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from osftkit.hardware import FSDP2Strategy, check_master_weights, consolidated_state_dict
from osftkit.models.loading import enable_checkpointing
from osftkit.models.logprobs import token_logprobs
from osftkit.rollout import HFGenerateEngine, PagedEngine

# Qwen/Qwen2.5-Math-1.5B and -7B config.json (architecture only); EOS <|endoftext|>.
QWEN_1P5B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
QWEN_7B_2_LAYERS = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 2,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
EOS, PAD = 151643, 151643
GIB = 2**30


def settings(tiny: bool) -> dict:
    """Batch shapes: the GPU run's, or the rehearsal's (same code, small numbers)."""
    if tiny:
        return {
            "prompts": 4,
            "prompt": 16,
            "response": 16,
            "micro": 2,
            "fsdp_rows": 2,
            "fsdp_prompt": 32,
            "fsdp_response": 96,
            "fsdp_micro": 1,
        }
    return {
        "prompts": 32,
        "prompt": 256,
        "response": 512,
        "micro": 4,
        "fsdp_rows": 4,
        "fsdp_prompt": 1024,
        "fsdp_response": 3072,
        "fsdp_micro": 1,
    }


def qwen(shape: dict, tiny: bool, device: torch.device, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        **{**shape, **(TINY if tiny else {})},
        max_position_embeddings=4096,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    with device:
        return Qwen2ForCausalLM(config)  # fp32: the master weights


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(device: torch.device) -> float | None:
    return float(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None


def autocast(device: torch.device):
    """hardware=gpu computes in bf16 over the fp32 weights; the CPU rehearsal stays fp32."""
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")


def random_prompts(rows: int, length: int, vocab: int, seed: int) -> tuple:
    ids = torch.randint(0, EOS, (rows, length), generator=torch.Generator().manual_seed(seed))
    return ids % vocab, torch.ones_like(ids)


def rollout(engine, model, prompts, device, response: int) -> tuple:
    """Sample one response per prompt at tau_s = 0.6; returns (rollouts, tokens per second)."""
    ids, mask = (t.to(device) for t in prompts)
    synchronize(device)
    start = time.perf_counter()
    with autocast(device):
        out = engine.generate(
            model,
            ids,
            mask,
            num_samples=1,
            temperature=0.6,
            top_p=1.0,
            max_new_tokens=response,
            eos_token_id=EOS,
            pad_token_id=PAD,
        )
    synchronize(device)
    return out, float(out.lengths.sum()) / (time.perf_counter() - start)


def train_step(model, sequences, attention, score, micro: int, optimizer) -> float:
    """One optimiser step in micro-batches of `micro` rows: the token mean is taken over the
    whole mini-batch (the kit's rule), each micro-batch's loss backpropagated at once."""
    total = score.sum().clamp(min=1)
    loss_sum = 0.0
    for rows in torch.split(torch.arange(len(sequences)), micro):
        logp, _ = token_logprobs(
            model,
            input_ids=sequences[rows],
            attention_mask=attention[rows],
            score_mask=score[rows],
            with_entropy=False,
        )
        loss = -(logp * score[rows]).sum() / total
        loss.backward()
        loss_sum += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def planned_step_bytes(directory: Path, s: dict, device: torch.device) -> float | None:
    """The planner's training-step estimate of this step (`python -m osftkit.plan`'s numbers),
    or None where the carried omegaconf / rich are missing."""
    try:
        from omegaconf import OmegaConf

        from osftkit.plan import estimate
    except ImportError:
        return None
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    cfg = OmegaConf.create(
        {
            "model": {
                "path": str(directory),
                "dtype": "bfloat16" if accelerator == "gpu" else "float32",
                "gradient_checkpointing": False,
            },
            "hardware": {"accelerator": accelerator, "devices": 1},
            "method": {
                "group_size": 1,
                "max_new_tokens": s["response"],
                "micro_batch_size": s["micro"],
                "logprob_chunk_size": 256,
            },
            "data": {
                "batch_size": s["prompts"],
                "val_batch_size": s["prompts"],
                "max_prompt_length": s["prompt"],
                "max_response_length": s["response"],
            },
            "validation": {"n_samples": 1, "max_new_tokens": s["response"]},
            "engine": {"_target_": "osftkit.rollout.HFGenerateEngine"},
        }
    )
    return estimate(cfg, gpu_memory_gb=141, num_gpus=1).train_peak


def osft_step(tiny: bool, device: torch.device, scratch: Path) -> dict:
    """Part 1 and 2: rollouts (hf, paged), the micro-batched step, the fp32-master check."""
    s = settings(tiny)
    model = qwen(QWEN_1P5B, tiny, device, seed=0)
    model.config.to_json_file(scratch / "config.json")  # the planner reads the shape
    vocab = model.config.vocab_size
    prompts = random_prompts(s["prompts"], s["prompt"], vocab, seed=1)
    model.eval()
    paged_tps = None  # engine=paged needs transformers >= 5.18 (page_size); the image has 5.17
    if hasattr(ContinuousBatchingConfig(), "page_size"):
        paged = PagedEngine({"page_size": 64, "max_batch_tokens": 1024})
        _, paged_tps = rollout(paged, model, prompts, device, s["response"])
    out, hf_tps = rollout(HFGenerateEngine(), model, prompts, device, s["response"])
    model.train()
    params = list(model.parameters())
    check_master_weights(params)
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01)
    batch = (out.sequences, out.attention_mask, out.loss_mask)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    with autocast(device):
        train_step(model, *batch, s["micro"], optimizer)
    synchronize(device)
    step_s, measured = time.perf_counter() - start, peak_bytes(device)
    planned = planned_step_bytes(scratch, s, device)
    before = [p.detach().clone() for p in params]
    for group in optimizer.param_groups:
        group["lr"] = 1e-7
    with autocast(device):
        train_step(model, *batch, s["micro"], optimizer)
    moved = sum(int((p != b).sum()) for p, b in zip(params, before, strict=True))
    seen_in_bf16 = sum(
        int((p.bfloat16() != b.bfloat16()).sum()) for p, b in zip(params, before, strict=True)
    )
    count = sum(p.numel() for p in params)
    return {
        "part": "osft_step_1p5b_shapes",
        "rows": s["prompts"],
        "tokens": s["prompt"] + s["response"],
        "micro_rows": s["micro"],
        "rollout_tokens_per_s": {
            "hf": round(hf_tps, 1),
            "paged": paged_tps and round(paged_tps, 1),
        },
        "step_s": round(step_s, 3),
        "peak_gib": measured and round(measured / GIB, 2),
        "planned_gib": planned and round(planned / GIB, 2),
        "planned_over_measured": planned and measured and round(planned / measured, 3),
        "lr_1e-7_share_moved_fp32": round(moved / count, 4),
        "lr_1e-7_share_seen_by_a_bf16_copy": round(seen_in_bf16 / count, 4),
        "ok": moved / count > 0.5 and seen_in_bf16 < moved,
    }


class FSDPStep(L.LightningModule):
    """One micro-batched optimiser step per batch on a model the strategy shards."""

    def __init__(self, model: torch.nn.Module, prompt: int, micro: int) -> None:
        super().__init__()
        self.model, self.prompt, self.micro = model, prompt, micro
        self.automatic_optimization = False

    def configure_model(self) -> None:
        self.trainer.strategy.shard(self.model)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        check_master_weights(self.model.parameters())
        return torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.01)

    def training_step(self, batch: list, batch_idx: int) -> None:
        ids = batch[0][0]
        score = torch.zeros_like(ids[:, 1:], dtype=torch.bool)
        score[:, self.prompt - 1 :] = True
        optimizer = self.optimizers()
        train_step(self.model, ids, torch.ones_like(ids), score, self.micro, optimizer)


class ResumeProbe(Callback):
    """On resume, before any step: are the weights and AdamW's state those saved?"""

    def __init__(self, saved: dict[str, torch.Tensor]) -> None:
        self.saved, self.same_weights, self.adam_steps = saved, None, None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        now = consolidated_state_dict(module.model)
        self.same_weights = all(torch.equal(now[k], v) for k, v in self.saved.items())
        state = trainer.optimizers[0].state
        self.adam_steps = sorted({float(v["step"]) for v in state.values()})


def fsdp_trainer(device: torch.device, steps: int, callbacks: list) -> L.Trainer:
    strategy = FSDP2Strategy(
        layer_classes=["transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer"],
        param_dtype="bfloat16" if device.type == "cuda" else "float32",
        **({} if device.type == "cuda" else {"process_group_backend": "gloo"}),
    )
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fsdp_7b_layers(tiny: bool, device: torch.device, scratch: Path) -> dict:
    """Part 3: FSDP2 step, DCP save and resume, HF export."""
    s = settings(tiny)
    width = s["fsdp_prompt"] + s["fsdp_response"]
    vocab = QWEN_7B_2_LAYERS["vocab_size"]
    ids = torch.randint(
        0, vocab, (2, s["fsdp_rows"], width), generator=torch.Generator().manual_seed(2)
    )
    data = DataLoader(TensorDataset(ids), batch_size=1)
    model = qwen(QWEN_7B_2_LAYERS, tiny, device, seed=3)
    enable_checkpointing(model)  # transformers < 5.23: its gradient_checkpointing_enable
    module = FSDPStep(model, s["fsdp_prompt"], s["fsdp_micro"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = fsdp_trainer(device, 1, [])
    start = time.perf_counter()
    trainer.fit(module, data)
    synchronize(device)
    step_s, measured = time.perf_counter() - start, peak_bytes(device)
    checkpoint = scratch / "dcp.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = consolidated_state_dict(module.model)
    export = scratch / "export"
    module.model.save_pretrained(export, state_dict=saved)
    exported = AutoModelForCausalLM.from_pretrained(export).state_dict()
    export_equal = all(torch.equal(exported[k], v) for k, v in saved.items())
    del trainer, module, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    probe = ResumeProbe(saved)
    resumed = FSDPStep(qwen(QWEN_7B_2_LAYERS, tiny, device, seed=4), s["fsdp_prompt"], 1)
    again = fsdp_trainer(device, 2, [probe])
    again.fit(resumed, data, ckpt_path=str(checkpoint))
    return {
        "part": "fsdp2_7b_layer_shapes",
        "rows": s["fsdp_rows"],
        "tokens": width,
        "micro_rows": s["fsdp_micro"],
        "fit_with_one_step_s": round(step_s, 2),
        "peak_gib": measured and round(measured / GIB, 2),
        "dcp_files": len(list(checkpoint.iterdir())),
        "resume_same_weights": probe.same_weights,
        "resume_adam_steps": probe.adam_steps,
        "resumed_to_step": again.global_step,
        "export_equal": export_equal,
        "ok": bool(
            probe.same_weights
            and probe.adam_steps == [1.0]
            and export_equal
            and again.global_step == 2
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU rehearsal: small shapes")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("no GPU visible: run with --tiny for the CPU rehearsal", file=sys.stderr)
        return 2
    torch.set_num_threads(1 if device.type == "cpu" else 8)
    import transformers

    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "lightning": L.__version__,
                "transformers": transformers.__version__,
                "device": str(device),
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            }
        )
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="osftkit-acceptance-") as scratch:
        for part in (osft_step, fsdp_7b_layers):
            start = time.perf_counter()
            directory = Path(scratch) / part.__name__
            directory.mkdir()
            result = part(args.tiny, device, directory)
            result["wall_s"] = round(time.perf_counter() - start, 1)
            results.append(result)
            print(json.dumps(result), flush=True)
    failed = [r["part"] for r in results if not r["ok"]]
    print("acceptance:", "FAILED " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
