"""The HTTP side: health and Prometheus metrics, next to the gRPC server."""

from __future__ import annotations

import asyncio

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.chat import ChatCompletions
from service.config import Config
from service.models import ModelRegistry
from service.servicer import Phase, ServingState


def create_app(config: Config, completions: ChatCompletions, registry: ModelRegistry, state: ServingState) -> Starlette:
    async def live(_: Request) -> Response:
        return JSONResponse({"status": "live"})

    async def ready(_: Request) -> Response:
        ok = state.phase is Phase.SERVING
        return JSONResponse({"status": state.phase.value}, status_code=200 if ok else 503)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/health/live", live),
        Route("/health/ready", ready),
        Route("/metrics", metrics),
    ])


class HttpServer:
    """uvicorn inside the server's event loop, started and stopped with it."""

    def __init__(self, config: Config, completions: ChatCompletions, registry: ModelRegistry,
                 state: ServingState) -> None:
        app = create_app(config, completions, registry, state)
        self._server = uvicorn.Server(uvicorn.Config(app, host=config.server.host, port=config.server.http_port,
                                                     log_config=None, access_log=False, lifespan="off"))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise SystemExit("HTTP server failed to start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task:
            await self._task
