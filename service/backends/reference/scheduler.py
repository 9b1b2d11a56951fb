"""Iteration-level scheduling: which sequences run in the next step, and how many tokens each.

Requests are admitted first come, first served, when a running slot and the
KV blocks they can ever need are free (see block_manager), so admitted work
is never starved or preempted and a large request is not overtaken forever.
Every running sequence in decode advances one token per step; prefills use
the rest of the step's token budget, chunked when long.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from service.backends.reference.block_manager import BlockManager
from service.backends.reference.sequence import Sequence, Status


@dataclass(eq=False)
class Group:
    """A request's n choices. The first choice prefills the prompt; the others fork from it after."""

    request_id: str
    seqs: list[Sequence]

    @property
    def leader(self) -> Sequence:
        return self.seqs[0]


@dataclass
class Plan:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (sequence, first position, tokens)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running: int, max_step_tokens: int) -> None:
        self.blocks = blocks
        self.max_running = max_running
        self.max_step_tokens = max(max_step_tokens, max_running)
        self.waiting: deque[Group] = deque()
        self.running: list[Sequence] = []
        self.groups: dict[str, Group] = {}

    def blocks_needed(self, group: Group) -> list[int]:
        """Blocks each sequence of the group may ever need; the forks share the prompt's full blocks."""
        s = group.leader
        total = self.blocks.blocks_for(len(s.prompt) + s.params.max_tokens)
        shared = len(s.prompt) // self.blocks.block_size
        return [total] + [total - shared] * (len(group.seqs) - 1)

    def add(self, group: Group) -> None:
        self.groups[group.request_id] = group
        self.waiting.append(group)

    def _admit(self) -> None:
        while self.waiting:
            group = self.waiting[0]
            needed = self.blocks_needed(group)
            if len(self.running) + len(group.seqs) > self.max_running or not self.blocks.can_reserve(sum(needed)):
                return
            self.waiting.popleft()
            self.blocks.reserve(sum(needed))
            now = time.monotonic()
            for seq, blocks in zip(group.seqs, needed, strict=True):
                seq.reserved = blocks
                seq.queue_time = now - seq.arrival
            self._take_cached_prefix(group.leader)
            group.leader.status = Status.PREFILL
            self.running.append(group.leader)

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Starts the prefill after the prompt's longest cached prefix of whole blocks, always leaving at least
        the last prompt token to compute (its logits give the first output token)."""
        seq.block_keys = self.blocks.keys(seq.prompt)
        usable = seq.block_keys[:(len(seq.prompt) - 1) // self.blocks.block_size]
        seq.blocks = self.blocks.take_cached(usable, len(seq.prompt))
        seq.reserved -= len(seq.blocks)
        seq.remembered = len(seq.blocks)
        seq.computed = len(seq.blocks) * self.blocks.block_size

    def remember_prompt_blocks(self, seq: Sequence) -> None:
        """Offers the prompt blocks this step completed to the prefix cache."""
        full = min(min(seq.computed, len(seq.prompt)) // self.blocks.block_size, len(seq.block_keys))
        for i in range(seq.remembered, full):
            self.blocks.remember(seq.blocks[i], seq.block_keys[i])
        seq.remembered = max(seq.remembered, full)

    def schedule(self) -> Plan:
        self._admit()
        plan = Plan(decode=[s for s in self.running if s.status is Status.DECODE])
        budget = self.max_step_tokens - len(plan.decode)
        for seq in self.running:
            if seq.status is Status.PREFILL and budget > 0:
                n = min(len(seq.prompt) - seq.computed, budget)
                plan.prefill.append((seq, seq.computed, n))
                budget -= n
        for seq in plan.decode:
            self._ensure_blocks(seq, seq.length)
        for seq, start, n in plan.prefill:
            self._ensure_blocks(seq, start + n)
        return plan

    def _ensure_blocks(self, seq: Sequence, tokens: int) -> None:
        while len(seq.blocks) * self.blocks.block_size < tokens:
            seq.blocks.append(self.blocks.allocate())
            seq.reserved -= 1

    def fork(self, group: Group) -> list[Sequence]:
        """After the leader's prefill: the other choices share its full prompt blocks and each takes a block of
        its own for the partial last one (the caller copies its contents). Returns the forks."""
        leader = group.leader
        full = len(leader.prompt) // self.blocks.block_size
        for seq in group.seqs[1:]:
            seq.blocks = [self.blocks.share(b) for b in leader.blocks[:full]]
            if len(leader.blocks) > full:
                seq.blocks.append(self.blocks.allocate())
                seq.reserved -= 1
            seq.computed = leader.computed
            seq.status = Status.DECODE
            self.running.append(seq)
        return group.seqs[1:]

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq.blocks)
        self.blocks.unreserve(seq.reserved)
        seq.blocks, seq.reserved = [], 0
        seq.status = Status.FINISHED
        group = self.groups.get(seq.request_id)
        if group and all(s.status is Status.FINISHED for s in group.seqs):
            del self.groups[seq.request_id]
            if group in self.waiting:
                self.waiting.remove(group)
