"""Engine backends: the PyTorch reference engine in this process, or a model's gRPC workers (TensorRT-LLM, vLLM,
SGLang). Imports are deferred so a server imports only the engines its models use."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.backends.base import Engine
    from service.backends.workers.address import WorkerAddress
    from service.config import Config
    from service.repository.manifest import ModelManifest


def create_engine(name: str, manifest: ModelManifest | None, workers: list[WorkerAddress], config: Config) -> Engine:
    """The engine of a model: its gRPC workers when it has any, else its folder's backend."""
    if workers:
        from service.backends.workers.engine import WorkerEngine

        return WorkerEngine(name, workers, manifest, config.workers)
    assert manifest is not None
    if manifest.backend == "reference":
        from service.backends.reference import ReferenceEngine

        return ReferenceEngine(manifest, config.engine)
    if manifest.backend == "tensorrt-llm":
        raise ValueError(f"model {name!r} holds TensorRT-LLM profiles, which a TensorRT-LLM worker serves: run "
                         f"`llmserve trtllm-worker {name}` on its GPUs and give --worker {name}=trtllm://HOST:PORT "
                         f"(or list it in {manifest.root}/manifest.json's \"workers\")")
    raise ValueError(f"model {name!r}: backend \"workers\" and no workers; list them in {manifest.root}/"
                     f"manifest.json (\"workers\") or give --worker {name}=KIND://HOST:PORT")
