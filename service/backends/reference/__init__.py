"""The PyTorch reference engine: in-flight batching for Llama checkpoints, on CPU or CUDA."""

from service.backends.reference.engine import ReferenceEngine

__all__ = ["ReferenceEngine"]
