"""The Llama architecture over a paged KV cache, in one readable file.

Covers the target families: Llama 2 and CodeLlama (plain RoPE, any rope_theta),
Llama 3.1 and Nemotron (llama3 RoPE scaling), grouped-query attention. Weights
load from a Hugging Face safetensors checkpoint; q/k/v and gate/up are fused
at load so each layer runs three matmuls fewer per step.

A step's tokens are flat ([T]): decode tokens of many sequences and prefill
chunks side by side. Every token's K and V are written to its cache slot.
Decode sequences attend together, over their dense rows (decode_rows.py)
when the engine keeps them, else over their blocks gathered from the cache
(one index_select of whole blocks is ~7x faster than slot by slot); prefill
chunks attend one by one over their gathered blocks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from service.backends.reference.packed_linear import pack_linears, wide_pays


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_checkpoint(cls, path: Path) -> LlamaConfig:
        c = json.loads((path / "config.json").read_text())
        heads = c["num_attention_heads"]
        # Published checkpoints say rope_theta + rope_scaling; transformers 5 writes both as rope_parameters.
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        theta = c.get("rope_theta") or rope.get("rope_theta") or 10000.0
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"], num_heads=heads, num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=theta, rope_scaling=rope or None,
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
        )


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies, with Llama 3.1's long-context scaling when the checkpoint asks for it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_context / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv_freq.float()


def rope_tables(config: LlamaConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles. Plain tensors, not buffers: the model is built on the
    meta device and these are made once, on the real one, when it loads."""
    with torch.device(device):
        freqs = torch.outer(torch.arange(config.max_position_embeddings).float(), rope_frequencies(config))
    return freqs.cos(), freqs.sin()


@dataclass
class AttentionBatch:
    """Where a step's tokens go in the cache and which context each sequence attends to."""

    block_size: int
    slots: torch.Tensor                  # [T] cache slot of each token's K/V
    decode_rows: torch.Tensor | None     # [D] positions in the flat tokens of the decode tokens
    decode_blocks: torch.Tensor | None   # [D, B] each decode sequence's cache blocks, padded
    decode_mask: torch.Tensor | None     # [D, 1, 1, B * block_size] True where the context is real
    prefills: list[tuple[int, int, torch.Tensor, int]]  # (first row, rows, context blocks [B], start position)
    # Dense rows instead of decode_blocks: per layer (K, V) [rows, KV heads, capacity, head dim], row i holding
    # decode sequence i's context; each decode token's K/V is also written at its position in its row.
    decode_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    decode_positions: torch.Tensor | None = None  # [D]

    @property
    def decode_count(self) -> int:
        """Decode tokens come first in a step's rows, and first among its logit rows."""
        return 0 if self.decode_rows is None else len(self.decode_rows)

    def gather(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """[..., B] block ids -> [..., B * block_size, heads, head_dim] of the cache's contents."""
        by_block = cache.view(-1, self.block_size, *cache.shape[1:])
        out = by_block.index_select(0, blocks.reshape(-1))
        return out.view(*blocks.shape[:-1], blocks.shape[-1] * self.block_size, *cache.shape[1:])


class Linear(nn.Linear):
    """A bias-free Linear that takes the step's count of decode rows, which only a CPU's PackedLinear uses."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, decode_rows: int | None = None) -> torch.Tensor:
        return super().forward(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One call, which computes in float32 whatever x's type: a step is bound by its number of operations.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in Hugging Face's half-split layout (its checkpoints' q/k weights are permuted for it)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per sequence ([D, H, hd]) over its context ([D, KVH, L, hd]) -> [D, H, 1, hd] in q's dtype: two
    batched matmuls and a softmax, in float32 (the dense decode rows are float32 whatever the model's dtype).

    On a CPU, scaled_dot_product_attention's kernel for one query row is ~10x slower in bfloat16 than these
    matmuls (2.0 against 0.2 ms for 16 sequences of 128 tokens), and no faster in float32; bfloat16 matmuls go
    to oneDNN, which builds and keeps a kernel for every (D, L) it meets, a context length that grows every
    step: ~900 MB held after a few thousand shapes, where float32's stay flat. Each KV head's query heads are
    one matrix, so K and V are read once per KV head."""
    d, heads, head_dim = q.shape
    kv_heads, span = k.shape[1], k.shape[2]
    grouped = q.float().view(d, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, k.float().transpose(-1, -2)).mul_(head_dim ** -0.5)
    scores.masked_fill_(~mask.view(d, 1, 1, span), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
    return out.view(d, heads, 1, head_dim).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.qkv = Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
        self.o = Linear(c.num_heads * c.head_dim, c.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, batch: AttentionBatch, layer: int) -> torch.Tensor:
        t = x.shape[0]
        d = batch.decode_count
        qkv = self.qkv(x, d).view(t, self.heads + 2 * self.kv_heads, self.head_dim)
        qk = rotate(qkv[:, :self.heads + self.kv_heads], cos, sin)  # q and k heads rotated in one pass
        q, k, v = qk[:, :self.heads], qk[:, self.heads:], qkv[:, self.heads + self.kv_heads:]
        k_cache[batch.slots] = k
        v_cache[batch.slots] = v
        if batch.decode_rows is None:
            od = None
        elif batch.decode_kv is not None:
            dk, dv = batch.decode_kv[layer]
            d, rows, positions = len(batch.decode_rows), batch.decode_rows, batch.decode_positions
            dk[rows, :, positions] = k[:d].to(dk.dtype)  # decode tokens come first, in row order: slices,
            dv[rows, :, positions] = v[:d].to(dv.dtype)  # not gathers
            span = batch.decode_mask.shape[-1]
            od = decode_attention(q[:d], dk[:d, :, :span], dv[:d, :, :span], batch.decode_mask)  # [D, H, 1, hd]
        else:
            kd = batch.gather(k_cache, batch.decode_blocks).transpose(1, 2)     # [D, KVH, L, hd]
            vd = batch.gather(v_cache, batch.decode_blocks).transpose(1, 2)
            od = decode_attention(q[batch.decode_rows], kd, vd, batch.decode_mask)
        if not batch.prefills:  # pure decode: the decode rows are all the rows
            return self.o(od.reshape(t, -1), d)
        out = torch.empty_like(q)
        if od is not None:
            out[batch.decode_rows] = od.squeeze(2)
        for first, rows, blocks, start in batch.prefills:
            length = start + rows
            qp = q[first:first + rows].transpose(0, 1).unsqueeze(0)            # [1, H, Q, hd]
            kp = batch.gather(k_cache, blocks)[:length].transpose(0, 1).unsqueeze(0)  # [1, KVH, L, hd]
            vp = batch.gather(v_cache, blocks)[:length].transpose(0, 1).unsqueeze(0)
            if start == 0:
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
            else:  # a later chunk: its queries see the earlier chunks and, causally, themselves
                mask = torch.ones(rows, length, dtype=torch.bool, device=x.device).tril(start)
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)
            out[first:first + rows] = op.squeeze(0).transpose(0, 1)
        return self.o(out.view(t, -1), d)


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.inter = c.intermediate_size
        self.gate_up = Linear(c.hidden_size, 2 * c.intermediate_size)
        self.down = Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x: torch.Tensor, decode_rows: int) -> torch.Tensor:
        gate, up = self.gate_up(x, decode_rows).split(self.inter, dim=-1)
        return self.down(F.silu(gate) * up, decode_rows)


class Block(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.cos = self.sin = torch.empty(0)  # rope_tables, made on the real device when the weights load

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
                batch: AttentionBatch, logit_rows: torch.Tensor) -> torch.Tensor:
        """Runs a step and returns float32 logits of the rows in logit_rows only."""
        x = self.embed(tokens)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv, strict=True)):
            x = x + layer.attn(layer.attn_norm(x), cos, sin, k_cache, v_cache, batch, i)
            x = x + layer.mlp(layer.mlp_norm(x), batch.decode_count)
        return self.lm_head(self.norm(x[logit_rows]), batch.decode_count).float()


def load_model(checkpoint: Path, dtype: torch.dtype, device: torch.device) -> Llama:
    """Builds the model from Hugging Face safetensors, fusing q/k/v and gate/up."""
    config = LlamaConfig.from_checkpoint(checkpoint)
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    with torch.device("meta"):
        model = Llama(config)
    state = {"embed.weight": weights["model.embed_tokens.weight"], "norm.weight": weights["model.norm.weight"]}
    state["lm_head.weight"] = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        state |= {
            f"layers.{i}.attn_norm.weight": weights[p + "input_layernorm.weight"],
            f"layers.{i}.mlp_norm.weight": weights[p + "post_attention_layernorm.weight"],
            f"layers.{i}.attn.qkv.weight": torch.cat([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]),
            f"layers.{i}.attn.o.weight": weights[p + "self_attn.o_proj.weight"],
            f"layers.{i}.mlp.gate_up.weight": torch.cat([weights[p + "mlp.gate_proj.weight"],
                                                          weights[p + "mlp.up_proj.weight"]]),
            f"layers.{i}.mlp.down.weight": weights[p + "mlp.down_proj.weight"],
        }
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    model.cos, model.sin = (table.to(dtype) for table in rope_tables(config, device))
    model = model.to(device).eval()
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        pack_linears(model, wide_pays(config.hidden_size, 2 * config.intermediate_size, dtype))
    return model
