"""The served models: each manifest in the engines directory, loaded, warmed up and looked up by name."""

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
from service.config import Config
from service.errors import ServiceError
from service.models.template import ChatTemplate
from service.repository.manifest import ModelManifest, discover

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
        self._manifests = manifests if manifests is not None else discover(config.server.engines_dir)
        if not self._manifests:
            raise SystemExit(f"no models in {config.server.engines_dir}: run `python build_engine.py --demo`")
        self._models: dict[str, ServedModel] = {}

    @property
    def names(self) -> list[str]:
        return [m.name for m in self._manifests]

    async def load(self) -> None:
        """Starts every engine and runs a real one-token generation on it before it is served."""
        for manifest in self._manifests:
            started = time.monotonic()
            engine = create_engine(manifest, self._config)
            await engine.start()
            model = ServedModel(manifest, engine, ChatTemplate(engine.tokenizer, manifest.chat_template))
            await self._warm_up(model)
            self._models[manifest.name] = model
            seconds = round(time.monotonic() - started, 2)
            log.info("model ready", extra={"model": manifest.name, "backend": manifest.backend,
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

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    async def shutdown(self) -> None:
        for model in self._models.values():
            await model.engine.shutdown()
