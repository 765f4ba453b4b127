"""callbacks=large_model (the 7B presets'): the best checkpoint holds the weights only, last.ckpt
everything a resume needs, and no step checkpoint is written."""

from pathlib import Path

import torch

from osftkit.train import build_components, build_trainer, instantiate_group


def test_large_model_checkpoints_best_weights_only_and_last_in_full(fast_cfg):
    cfg = fast_cfg(
        "method=sft", "callbacks=large_model", "callbacks.progress_bar=null", "logger=none",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "validate_before_fit=false",
    )  # fmt: skip
    assert cfg.callbacks.step_checkpoint is None
    _, datamodule, module = build_components(cfg)
    build_trainer(cfg, instantiate_group(cfg.callbacks), []).fit(module, datamodule)
    saved = {p.name: p for p in (Path(cfg.paths.output_dir) / "checkpoints").iterdir()}
    assert "last.ckpt" in saved and len(saved) == 2, sorted(saved)
    (best,) = [p for name, p in saved.items() if name != "last.ckpt"]
    best_state = torch.load(best, weights_only=True, map_location="cpu")
    last_state = torch.load(saved["last.ckpt"], weights_only=True, map_location="cpu")
    assert "optimizer_states" not in best_state and "state_dict" in best_state
    assert last_state["optimizer_states"] and last_state["global_step"] == 4
