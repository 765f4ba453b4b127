"""TensorDataModule: the loaders shared by the small tensor data sets (features, digits, text)."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class TensorDataModule(L.LightningDataModule):
    """Train and validation `TensorDataset`s, shuffled by a seeded generator.

    Subclasses save `seed`, `batch_size`, `num_train` and `num_val` as hyperparameters and either
    implement `make_split(num, seed)` or override `setup` to fill `train_set` and `val_set`.
    """

    train_set: TensorDataset
    val_set: TensorDataset

    def make_split(self, num: int, seed: int) -> TensorDataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self.make_split(self.hparams.num_train, self.hparams.seed)
        self.val_set = self.make_split(self.hparams.num_val, self.hparams.seed + 1)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self.train_set, self.hparams.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.hparams.batch_size)
