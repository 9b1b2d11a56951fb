"""KV cache blocks: a free pool with reference counts, and a cache of prompt blocks by content.

A request reserves, at admission, every block it can ever need (prompt plus
max_tokens, for each of its n choices), so a running sequence never waits for
memory and nothing is ever preempted: memory pressure shows up as queueing,
not as running requests stalling each other. Choices of one request share the
prompt's full blocks by reference count.

Prefix caching: a full prompt block, once computed, is keyed by a hash of its
tokens chained with the hashes of every block before it (so equal keys mean
equal prefixes, as in vLLM). A later prompt that starts the same way takes
those blocks instead of computing them; chat templates put the same system
header in front of every conversation, so most requests skip part of their
prefill. A released block keeps its contents and key while it sits in the
free pool; the pool hands out the least recently released block first, so
what is evicted is what was used longest ago. The hash is cryptographic
(blake2b) because a collision would hand one user's KV to another's prompt.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # least recently released first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}    # block -> key of the prompt prefix it holds
        self._block_of: dict[bytes, int] = {}  # key -> block
        self.reserved = 0  # blocks promised to admitted requests but not yet allocated
        self.queried_tokens = 0  # prompt tokens looked up in the cache, and those found there
        self.hit_tokens = 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_reserve(self, blocks: int) -> bool:
        return blocks <= len(self._free) - self.reserved

    def reserve(self, blocks: int) -> None:
        self.reserved += blocks

    def unreserve(self, blocks: int) -> None:
        self.reserved -= blocks

    def allocate(self) -> int:
        """Takes one reserved block; the least recently released one, whose cached contents are forgotten."""
        block, _ = self._free.popitem(last=False)
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]
        self._refs[block] = 1
        self.reserved -= 1
        return block

    def share(self, block: int) -> int:
        self._refs[block] += 1
        return block

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    # -- prefix caching --------------------------------------------------------------------------------------

    def keys(self, prompt: list[int]) -> list[bytes]:
        """The chained key of each full block of the prompt."""
        if not self.prefix_caching:
            return []
        keys: list[bytes] = []
        previous = b""
        bs = self.block_size
        for start in range(0, len(prompt) - bs + 1, bs):
            previous = hashlib.blake2b(previous + array("q", prompt[start:start + bs]).tobytes(),
                                       digest_size=16).digest()
            keys.append(previous)
        return keys

    def take_cached(self, keys: list[bytes], prompt_tokens: int) -> list[int]:
        """The longest run of cached blocks for these keys, each taken as one of the caller's reserved blocks."""
        blocks: list[int] = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            self.reserved -= 1
            blocks.append(block)
        self.queried_tokens += prompt_tokens
        self.hit_tokens += len(blocks) * self.block_size
        return blocks

    def remember(self, block: int, key: bytes) -> None:
        """Records that a block now holds the computed prefix with this key (the first holder wins)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key
