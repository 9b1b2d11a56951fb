"""The reference engine's linear layers on a CPU: weights prepacked for oneDNN, most of a real model's step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from service.backends.reference.model import Llama


class PackedLinear(nn.Module):
    """A bias-free Linear whose weight oneDNN has laid out for its CPU kernels once, at load.

    torch's own CPU matmul (MKL's sgemm, or oneDNN reordering the weight at every call) spends most of a real
    model's decode step: measured on SmolLM2-135M at 8 rows, the prepacked kernel runs a step's matmuls 1.9x
    faster in float32 and 3.5x in bfloat16 (docs/performance.md). oneDNN builds, and keeps, a kernel for
    each number of rows it meets, holding memory with it; so rows are padded to few sizes (`padded_rows`),
    and `warm` builds every one of them before the engine serves: its memory stops growing there, and the
    first requests do not pay for the builds."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = padded_rows(rows)
        if padded != rows:
            x = torch.cat((x, x.new_zeros(padded - rows, x.shape[1])))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")[:rows]

    def warm(self, most_rows: int, dtype: torch.dtype) -> None:
        for rows in sorted({padded_rows(r) for r in range(1, most_rows + 1)}):
            self(torch.zeros(rows, self.in_features, dtype=dtype))


PACK_ROWS = 16
EXACT_ROWS = 32


def padded_rows(rows: int) -> int:
    """Up to EXACT_ROWS (a decode step's batch) rows are their own size; more (prefill) are padded to a multiple
    of it, at most EXACT_ROWS - 1 rows of waste on a step that computes many."""
    return rows if rows <= EXACT_ROWS else -(-rows // EXACT_ROWS) * EXACT_ROWS


def pack_linears(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child.weight.detach()))


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
