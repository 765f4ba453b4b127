"""The training bar says how far a run is in the unit that bounds it."""

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from osftkit.console import RunProgressBar, train_position


@pytest.mark.parametrize(
    ("max_steps", "max_epochs", "expected"),
    [
        (200, -1, "step 37/200"),  # Lightning's own bar reads `Epoch 0/-2` here
        (200, None, "step 37/200"),
        (200, 5, "step 37/200"),  # the step bound is the one a run of the kit sets
        (-1, 10, "Epoch 0/9"),
        (-1, -1, "Epoch 0"),
    ],
)
def test_train_position_names_the_bound(max_steps, max_epochs, expected):
    assert train_position(max_steps, max_epochs, step=37, epoch=0) == expected


def test_the_bar_counts_steps_across_epochs(tmp_path):
    bar = RunProgressBar()
    trainer = L.Trainer(
        max_steps=6,
        max_epochs=-1,
        limit_train_batches=4,  # two epochs: the step count does not restart
        limit_val_batches=0,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    descriptions = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            descriptions.append(bar.progress.tasks[bar.train_progress_bar_id].description.strip())

    trainer.callbacks.append(Spy())
    trainer.fit(BoringModel())
    assert descriptions == [f"step {k}/6" for k in range(1, 7)]
