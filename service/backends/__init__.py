"""Engine backends. Imports are deferred so a server imports only the engines its models use (TensorRT-LLM's
code is never imported without a tensorrt-llm model, nor the workers' protocols without a worker)."""

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
    if manifest.backend == "workers":
        raise ValueError(f"model {name!r}: backend \"workers\" and no workers; list them in {manifest.root}/"
                         f"manifest.json (\"workers\") or give --worker {name}=KIND://HOST:PORT")
    from service.backends.trtllm import TrtllmEngine

    return TrtllmEngine(manifest, config.engine, config.trtllm)
