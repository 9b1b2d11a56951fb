"""The worker kinds, each with the client that speaks its protocol."""

from __future__ import annotations

from service.backends.workers.protocol import WorkerClient
from service.backends.workers.sglang import SglangClient
from service.backends.workers.trtllm import TrtllmClient
from service.backends.workers.vllm import VllmClient

CLIENTS: dict[str, type[WorkerClient]] = {c.kind: c for c in (TrtllmClient, VllmClient, SglangClient)}
