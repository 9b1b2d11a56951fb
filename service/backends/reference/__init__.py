"""The PyTorch reference engine: in-flight batching for Llama checkpoints, on CPU or CUDA."""

from service.backends.reference.async_engine import ReferenceEngine

__all__ = ["ReferenceEngine"]
