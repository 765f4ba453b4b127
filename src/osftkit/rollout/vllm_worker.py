"""Worker extension that vLLM mixes into its worker (`worker_extension_cls`).

Kept free of vLLM imports: vLLM resolves it by qualified name inside its worker, where `self`
is the worker (GPU or CPU) and `self.model_runner` its model runner. The engine calls it
through `LLM.collective_rpc`, which in the in-process `external_launcher` executor passes its
arguments by reference (no copy, no serialisation): a generator streams one tensor at a time.
"""

from collections.abc import Iterable

import torch
from torch import Tensor


class WeightSyncExtension:
    """Load checkpoint-named tensors into the worker's model; read a few back."""

    def osftkit_load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """vLLM's supported in-place reload (`Worker.reload_weights`, vLLM's `reload` module):
        it takes the model back to its checkpoint format, runs the model's own `load_weights`
        and re-applies the backend's weight processing (the CPU build repacks linear weights,
        so a bare `model.load_weights` on the processed model fails there)."""
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        self.osftkit_reprocess_tied_head()

    def osftkit_reprocess_tied_head(self) -> None:
        """A head tied to the embeddings loads nothing of its own, so the reload skips its
        processing (vLLM's reload module: "tied parameters only reflect processing from one of
        the parent layers"). The CPU build packs the head's weight for its GEMM there: without
        this the head kept computing with the first weights (caught by the agreement guard).
        On GPU the unquantized head's processing does nothing."""
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        if head is None or not hasattr(head, "quant_method"):
            return
        tied = any(
            param is head.weight
            for name, param in model.named_parameters(remove_duplicate=False)
            if not name.startswith("lm_head.")
        )
        if tied:
            head.quant_method.process_weights_after_loading(head)

    def osftkit_checksums(self, names: list[str]) -> dict[str, Tensor]:
        """Float64 sum and sum of squares of the named parameters the engine holds now."""
        params = dict(self.model_runner.get_model().named_parameters())
        return {name: checksum(params[name]) for name in names if name in params}


def checksum(tensor: Tensor) -> Tensor:
    """Sum and sum of squares in float64: equal for equal tensors, different after a step."""
    t = tensor.detach().double().cpu()
    return torch.stack([t.sum(), (t * t).sum()])
