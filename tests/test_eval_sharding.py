"""Validation over several ranks counts each problem once: the ranks' shares are padded to the
same number of steps (FSDP's collectives pair up), and the padding rows are generated but left
out of every metric."""

import types

import pytest
import torch

from osftkit.methods.validation import flatten
from osftkit.metrics import PassAtK
from osftkit.metrics.pass_at_k import counted_rows
from osftkit.train import build_components, build_trainer

PROBLEMS = 6


def rank_batches(datamodule, world: int, rank: int) -> list[dict]:
    datamodule.trainer = types.SimpleNamespace(world_size=world, global_rank=rank)
    return list(datamodule.val_dataloader()[0])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_problem_is_counted_once_and_every_rank_runs_the_same_steps(fast_cfg, world):
    cfg = fast_cfg(f"data.val.arithmetic.size={PROBLEMS}", f"data.val_batch_size={world}")
    _, datamodule, _ = build_components(cfg)
    datamodule.setup("validate")
    per_rank = [rank_batches(datamodule, world, rank) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # same number of steps
    counted = [
        problem
        for batches in per_rank
        for batch in batches
        for problem, keep in zip(batch["problem"], counted_rows(batch), strict=True)
        if keep
    ]
    assert sorted(counted) == sorted(datamodule.splits["val/arithmetic"]["problem"])
    padding = sum(int(b["is_padding"].sum()) for batches in per_rank for b in batches)
    assert padding == -PROBLEMS % world  # DistributedSampler's padding: 30 -> 32 on 4 ranks


def test_pass_at_k_leaves_out_the_rows_not_counted():
    correct = torch.tensor([[True, False], [False, False], [True, True]])
    masked, kept = PassAtK([1, 2]), PassAtK([1, 2])
    masked.update(correct, torch.tensor([True, False, True]))
    kept.update(correct[[0, 2]])
    assert masked.compute() == kept.compute()


def test_padded_ranks_score_like_one_process(fast_cfg):
    """The metrics of 4 ranks' shares (6 problems padded to 8), updated into one module as the
    ranks' synced states would be, equal one process's over the 6 (greedy decoding: no
    sampling noise)."""
    cfg = fast_cfg(
        "method=osft", "hardware=cpu", f"data.val.arithmetic.size={PROBLEMS}",
        "data.val_batch_size=4", "validation.tau_eval=0.0", "validation.n_samples=1",
        "validation.ks=[1]",
    )  # fmt: skip
    _, datamodule, module = build_components(cfg)
    trainer = build_trainer(cfg, [], [])
    (one_process,) = trainer.validate(module, datamodule)
    real_trainer = module.trainer
    batches = [b for rank in range(4) for b in rank_batches(datamodule, 4, rank)]
    datamodule.trainer = real_trainer
    assert sum(int(b["is_padding"].sum()) for b in batches) == 2
    with torch.no_grad():
        for batch in batches:
            module.validation_step(batch, batch_idx=1)
    computed = flatten(module.val_metrics["arithmetic"].compute())
    for name in ("pass@1", "greedy_acc", "response_length", "entropy"):
        assert computed[name].item() == pytest.approx(one_process[f"val/{name}"], abs=1e-6), name
