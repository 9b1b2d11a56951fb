"""Engine backends. Imports are deferred so a server with only reference models never imports TensorRT-LLM code."""

from __future__ import annotations

from service.backends.base import Engine
from service.config import Config
from service.repository.manifest import ModelManifest


def create_engine(manifest: ModelManifest, config: Config) -> Engine:
    if manifest.backend == "reference":
        from service.backends.reference import ReferenceEngine

        return ReferenceEngine(manifest, config.engine)
    from service.backends.trtllm import TrtllmEngine

    return TrtllmEngine(manifest, config.engine, config.trtllm)
