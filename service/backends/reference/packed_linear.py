"""The reference engine's linear layers on a CPU: weights prepacked for oneDNN, most of a real model's step."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from service.backends.reference.model import Llama

PACK_ROWS = 16
EXACT_ROWS = 32


def padded_rows(rows: int) -> int:
    """Up to EXACT_ROWS (a decode step's batch) rows are their own size; more (prefill) are padded to a multiple
    of it, at most EXACT_ROWS - 1 rows of waste on a step that computes many."""
    return rows if rows <= EXACT_ROWS else -(-rows // EXACT_ROWS) * EXACT_ROWS


def _run(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    rows = x.shape[0]
    padded = padded_rows(rows)
    if padded != rows:
        x = torch.cat((x, x.new_zeros(padded - rows, x.shape[1])))
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")[:rows]


class PackedLinear(nn.Module):
    """A bias-free Linear whose weight oneDNN has laid out for its CPU kernels once, at load.

    torch's own CPU matmul (MKL's sgemm, or oneDNN reordering the weight at every call) spends most of a real
    model's decode step: measured on SmolLM2-135M at 8 rows, the prepacked kernel runs a step's matmuls 1.6x
    faster in float32 (docs/performance.md). oneDNN builds, and keeps, a kernel for each number of rows it
    meets, holding memory with it; so rows are padded to few sizes (`padded_rows`), and `warm` builds every
    one of them before the engine serves: its memory stops growing there, and the first requests do not pay.

    With `wide`, a bfloat16 layer also keeps its weights packed in float32 for the prompt's rows: where a CPU
    has bfloat16 dot products but no matrix unit (AVX512-BF16 without AMX), its float32 kernel outruns the
    bfloat16 one once there are more than a few rows (1.5x at 32), while at a decode step's few rows reading
    half the bytes wins. The rows are split by kind, not by count, so a token's arithmetic never depends on
    what else shares its step: prompt tokens always take the float32 kernel, generated tokens the bfloat16."""

    def __init__(self, weight: torch.Tensor, wide: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        self.wide = torch.ops.mkldnn._reorder_linear_weight(weight.float(), PACK_ROWS) if wide else None

    def forward(self, x: torch.Tensor, decode_rows: int | None = None) -> torch.Tensor:
        """`decode_rows`: how many of the first rows are generated tokens (all, when None)."""
        narrow = x.shape[0] if decode_rows is None or self.wide is None else decode_rows
        if narrow == x.shape[0]:
            return _run(x, self.packed)
        prompt = _run(x[narrow:].float(), self.wide).to(x.dtype)
        return torch.cat((_run(x[:narrow], self.packed), prompt)) if narrow else prompt

    def warm(self, most_rows: int, dtype: torch.dtype) -> None:
        for rows in sorted({padded_rows(r) for r in range(1, most_rows + 1)}):
            x = torch.zeros(rows, self.in_features, dtype=dtype)
            self(x)
            if self.wide is not None:
                self(x, 0)


def wide_pays(in_features: int, out_features: int, dtype: torch.dtype, rows: int = 64) -> bool:
    """Whether this CPU's float32 kernel beats its `dtype` one by a clear margin (1.25x, so that timing noise
    cannot flip the choice) on a layer of this shape at a prompt's row count; best of five, in milliseconds."""
    if dtype == torch.float32:
        return False
    weight = torch.randn(out_features, in_features)

    def best(dt: torch.dtype) -> float:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dt), PACK_ROWS)
        x = torch.randn(rows, in_features, dtype=dt)
        _run(x, packed)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            _run(x, packed)
            times.append(time.perf_counter() - started)
        return min(times)

    with torch.inference_mode():
        return best(torch.float32) * 1.25 < best(dtype)


def pack_linears(model: nn.Module, wide: bool = False) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child.weight.detach(), wide))


def warm_linears(model: Llama, step_rows: int, logit_rows: int) -> None:
    """Builds the kernels of every padded row count a step can bring: up to `step_rows` for the layers, up to
    `logit_rows` for the head. Layers of the same shape share kernels, so one of each shape is run."""
    shapes: dict[tuple[int, int], PackedLinear] = {}
    for module in model.layers.modules():
        if isinstance(module, PackedLinear):
            shapes.setdefault((module.out_features, module.in_features), module)
    with torch.inference_mode():
        for module in shapes.values():
            module.warm(step_rows, model.embed.weight.dtype)
        if isinstance(model.lm_head, PackedLinear):
            model.lm_head.warm(logit_rows, model.embed.weight.dtype)
