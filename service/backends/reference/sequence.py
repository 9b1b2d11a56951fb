"""One choice of one request, as the scheduler and the sampler see it."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from service.backends.base import SamplingParams
from service.backends.detokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"      # admitted to the queue, no KV yet
    PREFILL = "prefill"      # prompt being computed, chunk by chunk
    DECODE = "decode"        # one token per step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int                      # which of the request's n choices
    prompt: list[int]
    params: SamplingParams
    rng: random.Random              # per choice: the same seed gives the same tokens whatever the batch
    detok: IncrementalDetokenizer
    deadline: float | None
    arrival: float
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0               # tokens whose K/V are in the cache
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache key of each full prompt block
    remembered: int = 0             # prompt blocks already recorded in the prefix cache
    reserved: int = 0               # blocks still reserved for this sequence
    status: Status = Status.WAITING
    queue_time: float = 0.0
    logits_processors: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]
