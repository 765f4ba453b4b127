"""scikit-learn's bundled 8x8 digits (no download) with square patches as the features."""

import torch
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import TensorDataset

from osftkit.data.null_samplers import GaussianConditionalSampler, Sampler
from osftkit.data.tensor_datamodule import TensorDataModule

IMAGE_SIZE = 8
MAX_INTENSITY = 16.0  # sklearn's digits take integer values 0..16


def patch_mask(image_size: int, patch_size: int) -> Tensor:
    """(1, H, W) feature ids of non-overlapping patch_size x patch_size patches, row-major."""
    if image_size % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide the image size {image_size}")
    rows = torch.arange(image_size) // patch_size
    return (rows[:, None] * (image_size // patch_size) + rows[None, :]).unsqueeze(0)


class DigitsDataModule(TensorDataModule):
    """Batches (image (b, 1, 8, 8) in [0, 1], label); patches sampled by a fitted Gaussian."""

    def __init__(
        self, patch_size: int = 2, val_fraction: float = 0.2, batch_size: int = 64, seed: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.feature_mask = patch_mask(IMAGE_SIZE, patch_size)

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        x, y = x / MAX_INTENSITY, torch.tensor(labels)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.hparams.seed))
        num_val = int(self.hparams.val_fraction * len(y))
        self.train_set = TensorDataset(x[order[num_val:]], y[order[num_val:]])
        self.val_set = TensorDataset(x[order[:num_val]], y[order[:num_val]])

    def feature_sampler(self) -> Sampler:
        """Gaussian inpainting: a patch drawn from its conditional given the other pixels."""
        return GaussianConditionalSampler.fit(self.train_set.tensors[0])
