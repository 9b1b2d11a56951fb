"""A step's plan -> tensors -> logits: the model, its paged KV cache and the dense decode rows, on one device.

The runner knows nothing of requests: it lays out the tokens the scheduler
planned (decode tokens first, in dense-row order, then prefill chunks), runs
one forward pass, and returns the logits of the rows that get a next token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from service.backends.reference.decode_rows import DecodeRows
from service.backends.reference.model import AttentionBatch, load_model
from service.backends.reference.packed_linear import warm_linears
from service.backends.reference.scheduler import Plan
from service.config import EngineConfig


def resolve_dtype(name: str, checkpoint: Path, device: torch.device) -> torch.dtype:
    """What `--dtype` means on `device`; the benchmarks' forward-step ceiling resolves it the same way."""
    if name == "auto":
        if device.type == "cpu":
            # bfloat16 halves the bytes a step reads, and CPUs with native bfloat16 dot products (AVX512-BF16,
            # AMX) run its prepacked matmuls 2-3x faster than float32's; elsewhere bfloat16 is emulated.
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            return torch.bfloat16 if native else torch.float32
        config = json.loads((checkpoint / "config.json").read_text())
        # Published checkpoints say torch_dtype; transformers 5 writes dtype.
        name = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class ModelRunner:
    def __init__(self, checkpoint: Path, config: EngineConfig) -> None:
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, checkpoint, self.device)
        self.model = load_model(checkpoint, self.dtype, self.device)
        c = self.model.config
        self.block_size = config.block_size
        self.num_blocks = max(1, config.max_cache_tokens // config.block_size)
        slots = self.num_blocks * config.block_size
        self.kv = [(torch.zeros(slots, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=self.device),
                    torch.zeros(slots, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=self.device))
                   for _ in range(c.num_layers)]
        self.decode_rows = DecodeRows(self.kv, config.block_size, config.max_running, slots)
        warm_linears(self.model, max(config.max_step_tokens, config.max_running), config.max_running)

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _batch(self, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        bs, device = self.block_size, self.device
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        dense = bool(plan.decode) and self.decode_rows.arrange(plan.decode)  # reorders plan.decode to row order
        for seq in plan.decode:
            p = seq.length - 1
            tokens.append(seq.last_token)
            positions.append(p)
            slots.append(seq.blocks[p // bs] * bs + p % bs)
        decode_rows = decode_blocks = decode_mask = decode_positions = None
        if plan.decode:
            d = len(plan.decode)
            decode_rows = torch.arange(d, device=device)  # the first d tokens, and the first d dense rows
            decode_positions = torch.tensor(positions, device=device)
            if dense:
                span = max(positions) + 1
            else:
                width = max(self._blocks_for(p + 1) for p in positions)
                span = width * bs
                decode_blocks = torch.tensor([s.blocks[:width] + [0] * (width - len(s.blocks)) for s in plan.decode],
                                             device=device)
            decode_mask = (torch.arange(span, device=device) < decode_positions.unsqueeze(1) + 1).view(d, 1, 1, span)
        logit_rows = list(range(len(plan.decode)))
        prefills = []
        for seq, start, n in plan.prefill:
            first = len(tokens)
            tokens += seq.prompt[start:start + n]
            positions += range(start, start + n)
            slots += [seq.blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            blocks = seq.blocks[:self._blocks_for(start + n)]
            prefills.append((first, n, torch.tensor(blocks, device=device), start))
            if start + n == len(seq.prompt):
                logit_rows.append(first + n - 1)
        batch = AttentionBatch(bs, torch.tensor(slots, device=device), decode_rows, decode_blocks, decode_mask,
                               prefills, self.decode_rows.layers if dense else None, decode_positions)
        return (torch.tensor(tokens, device=device), torch.tensor(positions, device=device), batch,
                torch.tensor(logit_rows, dtype=torch.long, device=device))  # empty for a mid-prompt chunk

    def forward(self, plan: Plan) -> torch.Tensor:
        """Float32 logits [rows, vocab]: one row per decode sequence (in plan.decode's order, which this call
        may rearrange), then one per prefill that reaches its prompt's end."""
        tokens, positions, batch, logit_rows = self._batch(plan)
        return self.model(tokens, positions, self.kv, batch, logit_rows)

    def copy_block(self, source: int, target: int) -> None:
        bs = self.block_size
        for k_cache, v_cache in self.kv:
            k_cache[target * bs:(target + 1) * bs] = k_cache[source * bs:(source + 1) * bs]
            v_cache[target * bs:(target + 1) * bs] = v_cache[source * bs:(source + 1) * bs]
