"""One worker as llmserve sees it: its client, whether it is in rotation, and how busy it is.

Busy counts two things: llmserve's own requests on it, which are exact and
current, and what the worker reported beyond those at its last load probe
(other gateways' requests), which is as fresh as the probe interval. A
prefix sketch remembers which prompt prefixes it has seen, so that requests
sharing one can go where its KV is already cached (router.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from service.backends.base import EngineStats, WorkerStatus
from service.backends.workers.protocol import Load, WorkerClient

BLOCK_TOKENS = 16          # prefix granularity: the block size of vLLM's and TensorRT-LLM's paged KV caches
SKETCH_BLOCKS = 65536      # prefixes remembered per worker: ~1M prompt tokens of distinct prefixes


def block_hashes(tokens: Sequence[int]) -> list[int]:
    """One hash per whole block of the prompt, each covering every token before it (as prefix caches key blocks)."""
    hashes, h = [], 0
    for i in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        h = hash((h, *tokens[i:i + BLOCK_TOKENS]))
        hashes.append(h)
    return hashes


class PrefixSketch:
    """The prompt blocks sent to one worker, least recently used first out."""

    def __init__(self, capacity: int = SKETCH_BLOCKS) -> None:
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._capacity = capacity

    def matched(self, hashes: list[int]) -> int:
        """How many leading blocks of a prompt this worker has seen."""
        count = 0
        for h in hashes:
            if h not in self._blocks:
                break
            count += 1
        return count

    def add(self, hashes: list[int]) -> None:
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)


class Worker:
    def __init__(self, client: WorkerClient) -> None:
        self.client = client
        self.healthy = False
        self.detail = "not probed yet"
        self.in_flight = 0        # llmserve's requests on it now
        self.load: Load | None = None
        self._others = 0          # requests it reported beyond llmserve's, at the last probe
        self.prefixes = PrefixSketch()

    @property
    def name(self) -> str:
        return str(self.client.address)

    @property
    def pending(self) -> int:
        return self.in_flight + self._others

    def reported(self, load: Load | None) -> None:
        self.load = load
        self._others = max(0, load.running + load.waiting - self.in_flight) if load else 0

    def status(self) -> WorkerStatus:
        stats = None
        if self.load is not None:
            stats = EngineStats(self.load.running, self.load.waiting, round(self.load.kv_usage * 1_000_000), 1_000_000)
        return WorkerStatus(self.name, self.client.kind, self.healthy, self.detail, self.in_flight, stats)
