"""KV cache blocks: a free list with reference counts.

A request reserves, at admission, every block it can ever need (prompt plus
max_tokens, for each of its n choices), so a running sequence never waits for
memory and nothing is ever preempted: memory pressure shows up as queueing,
not as running requests stalling each other. Choices of one request share the
prompt's full blocks by reference count.
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._refs = [0] * num_blocks
        self.reserved = 0  # blocks promised to admitted requests but not yet allocated

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_reserve(self, blocks: int) -> bool:
        return blocks <= len(self._free) - self.reserved

    def reserve(self, blocks: int) -> None:
        self.reserved += blocks

    def unreserve(self, blocks: int) -> None:
        self.reserved -= blocks

    def allocate(self) -> int:
        """Takes one reserved block."""
        block = self._free.pop()
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
                self._free.append(block)
