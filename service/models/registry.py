"""The served models: each manifest in the engines directory and each model given gRPC workers, loaded, warmed up
and looked up by name.

A model is served by its workers when it has any (`--worker NAME=KIND://HOST:PORT`, or its manifest's
`workers`), with its folder, if it has one, giving the tokenizer and chat template; otherwise by its folder's
engine.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from service.backends import create_engine
from service.backends.base import Engine, GenerationRequest, SamplingParams
from service.backends.workers.address import WorkerAddress, WorkerAddressError, parse_model_workers
from service.config import Config
from service.errors import ServiceError
from service.models.template import ChatTemplate
from service.repository.manifest import ManifestError, ModelManifest, discover

log = logging.getLogger("llmserve.models")


@dataclass
class ServedModel:
    manifest: ModelManifest
    engine: Engine
    template: ChatTemplate

    @property
    def name(self) -> str:
        return self.manifest.name



class ModelRegistry:
    def __init__(self, config: Config, manifests: list[ModelManifest] | None = None) -> None:
        self._config = config
        self._manifests = {m.name: m for m in (manifests if manifests is not None
                                                else discover(config.server.engines_dir))}
        try:
            flagged = parse_model_workers(config.workers.workers)
        except WorkerAddressError as e:
            raise ManifestError(f"--worker: {e}") from None
        self._workers: dict[str, list[WorkerAddress]] = {}
        for name in [*self._manifests, *(n for n in flagged if n not in self._manifests)]:
            listed = self._manifests[name].workers if name in self._manifests else ()
            self._workers[name] = [*listed, *(w for w in flagged.get(name, []) if w not in listed)]
        if not self._workers:
            raise SystemExit(f"no models in {config.server.engines_dir} and no --worker: run "
                             "`python build_engine.py --demo`")
        self._models: dict[str, ServedModel] = {}

    @property
    def names(self) -> list[str]:
        return list(self._workers)

    async def load(self) -> None:
        """Starts every engine and runs a real one-token generation on it before it is served."""
        for name, workers in self._workers.items():
            started = time.monotonic()
            manifest = self._manifests.get(name)
            engine = create_engine(name, manifest, workers, self._config)
            await engine.start()
            if workers:   # served under what the workers say (their context, their tokenizer when no folder)
                manifest = engine.manifest  # type: ignore[attr-defined]
            assert manifest is not None
            model = ServedModel(manifest, engine, ChatTemplate(engine.tokenizer, manifest.chat_template))
            await self._warm_up(model)
            self._models[name] = model
            seconds = round(time.monotonic() - started, 2)
            log.info("model ready", extra={"model": name, "backend": manifest.backend,
                                           "profile": engine.profile.id, "seconds": seconds})

    @staticmethod
    async def _warm_up(model: ServedModel) -> None:
        prompt = model.template.encode([{"role": "user", "content": "Hello"}])
        request = GenerationRequest(f"warmup-{uuid.uuid4().hex}", prompt, SamplingParams(max_tokens=1))
        async with aclosing(model.engine.generate(request)) as events:
            async for _ in events:
                pass

    def get(self, name: str) -> ServedModel:
        model = self._models.get(name)
        if model is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND,
                               f"model {name!r} is not served here; models: {', '.join(self.names)}")
        return model

    def serving(self) -> dict[str, bool]:
        """Each loaded model, and whether its engine can generate now (for a model on workers: one is in rotation)."""
        return {name: model.engine.health().ok for name, model in self._models.items()}

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    async def shutdown(self) -> None:
        for model in self._models.values():
            await model.engine.shutdown()
