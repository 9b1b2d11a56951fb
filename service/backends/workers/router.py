"""Which of a model's workers takes a request: the least loaded, unless another holds its prompt's prefix.

A worker that has seen the longest leading part of the prompt (its prefix
cache probably still holds that KV) wins, unless it has more than `slack`
requests beyond the least loaded worker: a cache hit saves a prefill, a queue
costs every token. Ties go to the least loaded, and exact ties rotate, so
equal workers share the load and all of them learn the prefixes every
prompt shares (the chat template's header). Workers out of rotation (failed
probe or connection) and those a request already failed on are skipped.
"""

from __future__ import annotations

from collections.abc import Collection

from service.backends.workers.worker import Worker


class Router:
    def __init__(self, workers: list[Worker], slack: int) -> None:
        self.workers = workers
        self._slack = slack
        self._turn = 0

    def pick(self, hashes: list[int], exclude: Collection[Worker] = ()) -> Worker | None:
        live = [w for w in self.workers if w.healthy and w not in exclude]
        if not live:
            return None
        self._turn = (self._turn + 1) % len(live)
        live = live[self._turn:] + live[:self._turn]
        least = min(live, key=lambda w: w.pending)
        matched = {w: w.prefixes.matched(hashes) for w in live}
        best = max(live, key=lambda w: (matched[w], -w.pending))
        chosen = best if matched[best] > matched[least] and best.pending - least.pending <= self._slack else least
        chosen.prefixes.add(hashes)
        return chosen
