"""Dense rows of K and V for the sequences in decode.

Decode attention reads every running sequence's whole context at every step.
Read from the paged cache, that context is first gathered block by block,
and on a CPU that gather is the largest single cost of a decode step (a
third of it at 32 sequences of ~150 tokens). So each sequence in decode also
keeps its context in one row of a dense buffer per layer, [rows, KV heads,
capacity, head dim]: a step writes one column per row and attention reads
the rows in place. A row is filled from the paged cache once, when its
sequence starts decoding; when a sequence ends, the last row moves into its
place, so the decode batch is always rows 0..D-1 in order.

The rows are float32 whatever the model's dtype: decode attention computes in
float32 (model.decode_attention says why), and reading bfloat16 rows would
convert the whole context at every step.

The paged cache stays the source of truth (prefill, prefix caching, forks of
n > 1), and decode tokens are written to both. The rows are extra memory,
bounded by the paged cache's own size: when they would need more (many long
contexts), the rows are dropped and decode reads the paged cache instead.
"""

from __future__ import annotations

import torch

from service.backends.reference.sequence import Sequence

_GROWTH = 64  # capacity grows in steps of this many positions


class DecodeRows:
    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, max_rows: int,
                 max_tokens: int) -> None:
        self.kv = kv
        self.block_size = block_size
        self.max_rows = max_rows
        self.max_tokens = max_tokens  # rows x capacity never exceeds this
        self.rows: list[Sequence] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.capacity = 0

    def arrange(self, decode: list[Sequence]) -> bool:
        """Puts `decode` in row order with every row filled; False when the rows would take more memory
        than allowed, and then the step reads the paged cache."""
        needed = -(-max(s.length for s in decode) // _GROWTH) * _GROWTH
        if self.max_rows * max(needed, self.capacity) > self.max_tokens:
            self.rows, self.layers, self.capacity = [], [], 0
            return False
        live = set(decode)
        for seq in [s for s in self.rows if s not in live]:
            self._remove(seq)
        if needed > self.capacity:
            self._grow(needed)
        known = set(self.rows)
        for seq in decode:
            if seq not in known:
                self._add(seq)
        decode[:] = self.rows
        return True

    def _grow(self, capacity: int) -> None:
        k_cache = self.kv[0][0]
        shape = (self.max_rows, k_cache.shape[1], capacity, k_cache.shape[2])
        grown = []
        for i in range(len(self.kv)):
            k = torch.zeros(shape, dtype=torch.float32, device=k_cache.device)
            v = torch.zeros_like(k)
            if self.layers:
                k[:, :, :self.capacity] = self.layers[i][0]
                v[:, :, :self.capacity] = self.layers[i][1]
            grown.append((k, v))
        self.layers, self.capacity = grown, capacity

    def _add(self, seq: Sequence) -> None:
        """Copies the sequence's computed context from its cache blocks into the next row."""
        row, n, bs = len(self.rows), seq.computed, self.block_size
        blocks = torch.tensor(seq.blocks[:-(-n // bs)], device=self.kv[0][0].device)
        for (k_cache, v_cache), (k, v) in zip(self.kv, self.layers, strict=True):
            for cache, dense in ((k_cache, k), (v_cache, v)):
                context = cache.view(-1, bs, *cache.shape[1:]).index_select(0, blocks).flatten(0, 1)[:n]
                dense[row, :, :n] = context.transpose(0, 1)
        self.rows.append(seq)

    def _remove(self, seq: Sequence) -> None:
        row, last = self.rows.index(seq), len(self.rows) - 1
        if row != last:
            for k, v in self.layers:
                k[row] = k[last]
                v[row] = v[last]
            self.rows[row] = self.rows[last]
        self.rows.pop()
