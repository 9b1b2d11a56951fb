"""A few threads for the CPU-heavy part of a request: parsing a large body, validating, rendering, tokenizing.

On the event loop, one request with a megabyte of content would stop every
other stream and the health checks for seconds while it is tokenized. Here it
waits its turn in a bounded pool instead (tokenizers and most of the template
work release the GIL or yield it every few milliseconds), so the loop keeps
forwarding tokens; the bound keeps a burst of large requests from taking all
the cores the engine and the loop need.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class WorkerPool:
    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="llmserve-work")

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
