"""RunInputs: what train.py hands a method module from the data config at construction, so that
no module reaches into `trainer.datamodule`."""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunInputs:
    """The data side of a run, as a method needs it (all optional outside train.py)."""

    checker: Any = None  # scores decoded answers against golds (rewards, accuracy)
    val_names: list[str] = field(default_factory=list)  # one name per validation dataloader
    prompt_settings: dict[str, Any] = field(default_factory=dict)  # format_prompt's settings
    batch_size: int | None = None  # prompts per training batch, over all ranks
    max_prompt_length: int | None = None
    max_response_length: int | None = None
    # seed offset -> one pass over the training prompts in an order of its own (GRPO's refill,
    # the offline OSFT set: offset 0 is the training order).
    train_batches: Callable[[int], Iterable[dict]] | None = None

    @classmethod
    def of(cls, datamodule: Any) -> "RunInputs":
        """The inputs a PromptDataModule gives (plain attributes; none are read later)."""
        return cls(
            checker=datamodule.checker,
            val_names=list(datamodule.val_names),
            prompt_settings=dict(datamodule.prompt_settings),
            batch_size=datamodule.batch_size,
            max_prompt_length=datamodule.max_prompt_length,
            max_response_length=datamodule.max_response_length,
            train_batches=lambda offset: datamodule.train_dataloader(seed_offset=offset),
        )
