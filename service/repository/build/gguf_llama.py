"""What a llama.cpp GGUF file says about a Llama, in Hugging Face's terms: its config, its tensors' names.

llama.cpp's converter (convert_hf_to_gguf.py) renames every tensor, moves the
config into `llama.*` metadata, permutes the rows of q and k (its RoPE rotates
interleaved pairs, Hugging Face's rotates halves) and, for Llama 3.1, replaces
rope_scaling by a precomputed `rope_freqs` tensor. This module undoes each of
those, and refuses, by name, whatever the reference engine's Llama cannot run:
another architecture, biases, mixture of experts, partial rotary embeddings,
tensor types gguf-py cannot dequantize.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf import dequantize as gguf_dequantize

SUPPORTED_ARCHITECTURES = ("llama",)
# llama.cpp's tensor names -> Hugging Face Llama's, per layer and global.
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's long-context RoPE factors, precomputed by llama.cpp's converter


class GGUFImportError(ValueError):
    """The file is not one the reference engine can serve; the message names what is unsupported."""


@functools.cache
def dequantizable_types() -> frozenset[GGMLQuantizationType]:
    """Every tensor type the installed gguf-py can turn into float32, found by dequantizing one zero block of each."""
    supported = set()
    for qtype in GGMLQuantizationType:
        _, block_bytes = GGML_QUANT_SIZES[qtype]
        try:
            gguf_dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError):
            continue
        supported.add(qtype)
    return frozenset(supported)


def field(reader: GGUFReader, key: str) -> Any:
    value = reader.get_field(key)
    return None if value is None else value.contents()


def _require(reader: GGUFReader, key: str) -> Any:
    value = field(reader, key)
    if value is None:
        raise GGUFImportError(f"the GGUF metadata has no {key}")
    return value


def check(reader: GGUFReader) -> None:
    """Refuses a file that is not a Llama, or holds biases or tensor types that cannot be dequantized."""
    architecture = field(reader, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(f"general.architecture {architecture!r} is not supported: the reference engine serves "
                              f"Llama models ({', '.join(SUPPORTED_ARCHITECTURES)})")
    biases = [t.name for t in reader.tensors if t.name.endswith(".bias")]
    if biases:
        raise GGUFImportError(f"bias tensors are not supported ({len(biases)}: {biases[0]}, ...): the reference "
                              "engine's Llama has none")
    supported = dequantizable_types()
    unsupported = Counter(t.tensor_type.name for t in reader.tensors if t.tensor_type not in supported)
    if unsupported:
        kinds = ", ".join(f"{name} ({count} tensors)" for name, count in sorted(unsupported.items()))
        raise GGUFImportError(f"tensor types that cannot be dequantized are not supported: {kinds}; supported: "
                              f"{', '.join(sorted(t.name for t in supported))}")


def _llama3_factors(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs for these Llama 3 parameters."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = (context / wavelength - low) / (high - low)
    ramp = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelength < context / high, 1.0, np.where(wavelength > context / low, factor, ramp))


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Recovers Llama 3.1's rope_scaling from the per-frequency factors llama.cpp stores as rope_freqs.

    The converter writes 1 for high frequencies, `factor` for low ones and a smooth ramp between. Only the
    ratios original_context / low_freq_factor and original_context / high_freq_factor can be recovered, which
    is all the formula uses, so low_freq_factor is taken as 1. None when nothing is scaled.
    """
    factors = np.asarray(factors, dtype=np.float64)
    factor = float(factors.max())
    if math.isclose(factor, 1.0) and math.isclose(float(factors.min()), 1.0):
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if len(factors) != len(inv_freq):
        raise GGUFImportError(f"{ROPE_FREQS} has {len(factors)} values; head_dim {head_dim} needs {len(inv_freq)}")
    ramp = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    if ramp.sum() < 2:
        raise GGUFImportError(f"{ROPE_FREQS} is not supported: it is not Llama 3 RoPE scaling (too few ramp values)")
    # On the ramp, 1 / r = (1 - s) / factor + s with s = (context / wavelength - low) / (high - low).
    smooth = (1 / factors[ramp] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_freq[ramp] / (2 * math.pi), smooth, 1)
    high = 1 - 1 / intercept
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
               "high_freq_factor": round(float(high), 6),
               "original_max_position_embeddings": round(float(slope * (high - 1)))}
    if not np.allclose(_llama3_factors(inv_freq, scaling), factors, rtol=1e-4, atol=1e-6):
        raise GGUFImportError(f"{ROPE_FREQS} is not supported: it does not match Llama 3 RoPE scaling "
                              f"(closest fit: {scaling})")
    return scaling


def _token_id(reader: GGUFReader, name: str) -> int | None:
    value = field(reader, f"tokenizer.ggml.{name}_token_id")
    return None if value is None else int(value)


def eos_token_ids(reader: GGUFReader) -> list[int]:
    """Every id the file says ends a generation: end-of-sequence first, then end-of-turn and end-of-message."""
    ids = [_token_id(reader, name) for name in ("eos", "eot", "eom")]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _rope_scaling(reader: GGUFReader, head_dim: int, theta: float) -> dict[str, Any] | None:
    scaling_type = field(reader, "llama.rope.scaling.type")
    if scaling_type not in (None, "none", "linear"):
        raise GGUFImportError(f"llama.rope.scaling.type {scaling_type!r} is not supported (none, linear, and "
                              f"Llama 3's {ROPE_FREQS} are)")
    rope_freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if rope_freqs is not None:
        return llama3_rope_scaling(np.asarray(rope_freqs.data), head_dim, theta)
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(_require(reader, "llama.rope.scaling.factor"))}
    return None


def llama_config(reader: GGUFReader) -> dict[str, Any]:
    """config.json, from the file's llama.* metadata, as published Llama checkpoints write it (float32 weights)."""
    heads = int(_require(reader, "llama.attention.head_count"))
    hidden = int(_require(reader, "llama.embedding_length"))
    head_dim = int(field(reader, "llama.attention.key_length") or hidden // heads)
    if int(field(reader, "llama.attention.value_length") or head_dim) != head_dim:
        raise GGUFImportError("attention.key_length != attention.value_length is not supported (not Llama attention)")
    if int(field(reader, "llama.rope.dimension_count") or head_dim) != head_dim:
        raise GGUFImportError("partial rotary embeddings are not supported (rope.dimension_count != head_dim)")
    if field(reader, "llama.expert_count"):
        raise GGUFImportError("mixture-of-experts models are not supported (llama.expert_count): the reference "
                              "engine's Llama is dense")
    theta = float(field(reader, "llama.rope.freq_base") or 10000.0)
    eos = eos_token_ids(reader)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(field(reader, "llama.vocab_size") or len(_require(reader, "tokenizer.ggml.tokens"))),
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_require(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, "llama.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_require(reader, "llama.context_length")),
        "rms_norm_eps": float(_require(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, head_dim, theta),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "bos_token_id": _token_id(reader, "bos"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": _token_id(reader, "padding"),
        "torch_dtype": "float32",
    }


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every weight of a Hugging Face Llama with this config, and its shape."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (q_dim, hidden), p + "self_attn.k_proj.weight": (kv_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv_dim, hidden), p + "self_attn.o_proj.weight": (hidden, q_dim),
                   p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                   p + "mlp.down_proj.weight": (hidden, inter)}
    return shapes


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[parts[0]]}.{suffix}"
    raise GGUFImportError(f"tensor {gguf_name!r} is not supported: it has no place in a Hugging Face Llama")


def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row permutation (within each head, interleaved pairs back to two halves)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_tensor(tensor: ReaderTensor, config: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """One tensor of the file, dequantized to float32, under its Hugging Face name and row order."""
    values = gguf_dequantize(tensor.data, tensor.tensor_type)  # float32, shaped (rows, columns)
    if not values.flags.writeable:  # an F32 tensor comes back as a view of the read-only file mapping
        values = values.copy()
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first
    weight = torch.from_numpy(values).reshape(shape)
    if tensor.name.endswith(".attn_q.weight"):
        weight = unpermute(weight, config["num_attention_heads"])
    elif tensor.name.endswith(".attn_k.weight"):
        weight = unpermute(weight, config["num_key_value_heads"])
    return hf_name(tensor.name), weight
