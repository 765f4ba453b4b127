"""Worker extension that vLLM mixes into its GPU worker (`worker_extension_cls`).

Kept free of vLLM imports: vLLM resolves it by qualified name inside its worker, where
`self.model_runner` is the worker's model runner. The engine calls it through
`LLM.collective_rpc`, which in the in-process `external_launcher` executor passes the
tensors by reference (no copy, no serialisation).
"""

from torch import Tensor


class WeightSyncExtension:
    """Load checkpoint-named tensors into the worker's model (vLLM's own weight loaders)."""

    def osftkit_load_weights(self, weights: list[tuple[str, Tensor]]) -> int:
        model = self.model_runner.get_model()  # unwraps vLLM's CUDA-graph wrappers
        model.load_weights(weights=weights)
        return len(weights)
