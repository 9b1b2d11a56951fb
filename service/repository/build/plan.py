"""Build planning: which precision and tensor-parallel size a Llama model needs on given GPUs, and why.

Pure arithmetic over the model's architecture, so `build_engine.py --plan` answers
"how many H100s does a 70B need?" on a laptop. The estimate follows how
TensorRT-LLM spends memory: the weights (split over tp ranks), a reserve for
the CUDA context, NCCL and activations, then `kv_cache_fraction` of what is left
for the paged KV cache. A plan must leave KV room for a useful batch
(`max_batch_size` sequences of `BATCH_TOKENS_PER_SEQUENCE` tokens) and for at
least one sequence of `max_seq_len`; otherwise it is refused, naming what it needs.
One file past the usual length: the arithmetic is one chain, best checked read
top to bottom.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from service.repository.gpus import GIB, Gpu

PRECISIONS = ("fp8", "bf16", "fp16")
FP8_MIN_CAPABILITY = (8, 9)
RUNTIME_RESERVE_BYTES = 2 * GIB     # CUDA context, cuBLAS/NCCL workspaces, TensorRT's own allocations
ACTIVATION_COPIES = 4               # live activation buffers of one step, in units of max_num_tokens x width
BATCH_TOKENS_PER_SEQUENCE = 2048


class PlanError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ModelArch:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    head_dim: int = 0            # 0: hidden_size // num_heads
    tie_word_embeddings: bool = False

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def layer_parameters(self) -> int:
        """Parameters of the decoder layers: what fp8 quantizes."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_size
        q_out = self.num_heads * self.head_size
        attention = h * q_out + 2 * h * kv + q_out * h
        mlp = 3 * h * self.intermediate_size
        return self.num_layers * (attention + mlp + 2 * h)

    @property
    def embedding_parameters(self) -> int:
        """Token embedding, LM head and final norm: kept in 16 bits even in fp8 engines."""
        tables = 1 if self.tie_word_embeddings else 2
        return tables * self.vocab_size * self.hidden_size + self.hidden_size

    @property
    def parameters(self) -> int:
        return self.layer_parameters + self.embedding_parameters


def _llama_70b(name: str, vocab: int, context: int) -> ModelArch:
    return ModelArch(name, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, intermediate_size=28672,
                     vocab_size=vocab, context_length=context)


TARGET_MODELS: dict[str, ModelArch] = {
    m.name: m
    for m in (
        _llama_70b("codellama-70b-instruct", 32016, 16384),
        _llama_70b("llama-2-70b-chat", 32000, 4096),
        _llama_70b("llama-3.1-70b-instruct", 128256, 131072),
        _llama_70b("llama-3.1-nemotron-70b-instruct", 128256, 131072),
    )
}


# The Hugging Face ids people name the target models by (their repositories' current and former names), and the
# short forms they are written in without the organisation: each maps to the target model's short name.
HF_IDS: dict[str, str] = {
    "codellama/CodeLlama-70b-Instruct-hf": "codellama-70b-instruct",
    "meta-llama/CodeLlama-70b-Instruct-hf": "codellama-70b-instruct",
    "meta-llama/Llama-2-70b-chat-hf": "llama-2-70b-chat",
    "meta-llama/Llama-2-70b-chat": "llama-2-70b-chat",
    "meta-llama/Llama-3.1-70B-Instruct": "llama-3.1-70b-instruct",
    "meta-llama/Meta-Llama-3.1-70B-Instruct": "llama-3.1-70b-instruct",
    "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF": "llama-3.1-nemotron-70b-instruct",
    "nvidia/Llama-3.1-Nemotron-70B-Instruct": "llama-3.1-nemotron-70b-instruct",
}
_ALIASES = {alias.lower(): name for hf_id, name in HF_IDS.items() for alias in (hf_id, hf_id.split("/")[1])}


def target_model(model: str) -> ModelArch | None:
    """The target model a short name, a Hugging Face id or its name without the organisation means (any case)."""
    key = model.lower()
    name = key if key in TARGET_MODELS else _ALIASES.get(key)
    return TARGET_MODELS[name] if name else None


def _positive_int(config: dict[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def arch_from_config(config: dict[str, Any], name: str, where: str = "config.json") -> ModelArch:
    """A Llama-family architecture from a Hugging Face config.json's fields."""
    heads = _positive_int(config, "num_attention_heads", where)
    kv_heads = config.get("num_key_value_heads", heads)
    if kv_heads is None:
        kv_heads = heads
    arch = ModelArch(
        name=name,
        hidden_size=_positive_int(config, "hidden_size", where),
        num_layers=_positive_int(config, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=_positive_int({"num_key_value_heads": kv_heads}, "num_key_value_heads", where),
        intermediate_size=_positive_int(config, "intermediate_size", where),
        vocab_size=_positive_int(config, "vocab_size", where),
        context_length=_positive_int(config, "max_position_embeddings", where),
        head_dim=_positive_int(config, "head_dim", where) if config.get("head_dim") is not None else 0,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    if heads % arch.num_kv_heads:
        raise PlanError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                        f"({arch.num_kv_heads})")
    return arch


def load_arch(model: str) -> ModelArch:
    """A checkpoint folder (or its config.json), or one of the target models by name or Hugging Face id."""
    path = Path(model)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        target = target_model(model)
        if target is None:
            raise PlanError(f"--model: {model!r} is neither a checkpoint folder with config.json nor a target model "
                            f"({', '.join(TARGET_MODELS)}, or their Hugging Face ids: {', '.join(HF_IDS)})")
        return target
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{config_path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise PlanError(f"{config_path}: must be a JSON object")
    name = (path if path.is_dir() else path.parent).resolve().name
    return arch_from_config(config, name, str(config_path))


def checkpoint_precision(folder: Path) -> str:
    """The precision a checkpoint's weights are stored in: fp8 for a ModelOpt FP8 export, else its torch_dtype
    (float32 counts as bf16, the precision it would be served in)."""
    quant = folder / "hf_quant_config.json"
    if quant.is_file():
        try:
            algo = json.loads(quant.read_text()).get("quantization", {}).get("quant_algo")
        except (json.JSONDecodeError, AttributeError):
            raise PlanError(f"{quant}: not a JSON object with a 'quantization' object") from None
        if algo == "FP8":
            return "fp8"
    config = json.loads((folder / "config.json").read_text())
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    if quant_method in ("fp8", "modelopt"):
        return "fp8"
    # Published checkpoints say torch_dtype; transformers 5 writes dtype.
    return "fp16" if (config.get("torch_dtype") or config.get("dtype")) == "float16" else "bf16"


def pytorch_dtype(folder: Path, requested: str) -> str:
    """The PyTorch backend serves a checkpoint's weights as they are: it does not quantize to fp8 on loading."""
    stored = checkpoint_precision(folder)
    if requested == "auto":
        return stored
    if "fp8" in (requested, stored) and requested != stored:
        raise PlanError(f"--dtype {requested}: {folder} holds {stored} weights, and the PyTorch backend serves fp8 "
                        "only from an FP8 checkpoint (quantized with ModelOpt); use --dtype auto or such a checkpoint")
    return requested


def weight_bytes(arch: ModelArch, precision: str) -> int:
    if precision == "fp8":
        return arch.layer_parameters + 2 * arch.embedding_parameters
    return 2 * arch.parameters


def kv_bytes_per_token(arch: ModelArch, precision: str, tp: int) -> int:
    """K and V of every layer for one token on one GPU: KV heads are split over the tp ranks."""
    element = 1 if precision == "fp8" else 2
    return 2 * arch.num_layers * (arch.num_kv_heads // tp) * arch.head_size * element


def reserve_bytes(arch: ModelArch, tp: int, max_num_tokens: int) -> int:
    width = arch.hidden_size + arch.intermediate_size // tp
    return RUNTIME_RESERVE_BYTES + ACTIVATION_COPIES * max_num_tokens * width * 2


def valid_tp_sizes(arch: ModelArch, limit: int) -> list[int]:
    """Powers of two up to `limit` that split both the attention and the KV heads evenly."""
    sizes, tp = [], 1
    while tp <= limit:
        if arch.num_heads % tp == 0 and arch.num_kv_heads % tp == 0:
            sizes.append(tp)
        tp *= 2
    return sizes


@dataclass(frozen=True, slots=True)
class Estimate:
    """Per-GPU memory at one tensor-parallel size."""

    tp: int
    weights_per_gpu: int
    reserve_per_gpu: int
    kv_budget_per_gpu: int      # kv_cache_fraction of what the weights and reserve leave
    kv_bytes_per_token: int     # per GPU
    kv_tokens: int              # tokens the KV cache holds, over all sequences
    kv_tokens_needed: int
    kv_cache_fraction: float

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.kv_tokens_needed

    @property
    def memory_needed_per_gpu(self) -> int:
        """Smallest GPU on which this tp size would fit (the KV budget being `kv_cache_fraction` of the rest)."""
        kv = self.kv_tokens_needed * self.kv_bytes_per_token / self.kv_cache_fraction
        return self.weights_per_gpu + self.reserve_per_gpu + int(kv)


@dataclass(frozen=True, slots=True)
class BuildPlan:
    model: str
    parameters: int
    gpu: Gpu
    gpu_count: int
    precision: str
    tp: int
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    kv_cache_fraction: float
    weights_total: int
    estimate: Estimate

    @property
    def profile_id(self) -> str:
        return f"{self.gpu.architecture}-{self.precision}-tp{self.tp}"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "parameters": self.parameters,
            "gpu": {"name": self.gpu.name, "architecture": self.gpu.architecture,
                    "memory_bytes": self.gpu.memory_bytes, "count": self.gpu_count},
            "precision": self.precision,
            "tensor_parallel_size": self.tp,
            "max_batch_size": self.max_batch_size,
            "max_seq_len": self.max_seq_len,
            "max_num_tokens": self.max_num_tokens,
            "kv_cache_fraction": self.kv_cache_fraction,
            "weights_bytes": self.weights_total,
            "per_gpu": asdict(self.estimate) | {"memory_needed": self.estimate.memory_needed_per_gpu},
            "profile_id": self.profile_id,
        }

    def describe(self) -> str:
        e = self.estimate
        return "\n".join([
            f"model              {self.model} ({self.parameters / 1e9:.1f}B parameters)",
            f"GPUs               {self.tp} of {self.gpu_count} x {self.gpu.describe()}",
            f"precision          {self.precision} (weights {self.weights_total / 1e9:.1f} GB in all)",
            f"tensor parallel    {self.tp}",
            f"per GPU            weights {e.weights_per_gpu / GIB:.1f} GiB, reserve {e.reserve_per_gpu / GIB:.1f} GiB, "
            f"KV cache {e.kv_budget_per_gpu / GIB:.1f} GiB ({self.kv_cache_fraction:.0%} of the rest)",
            f"KV cache           {e.kv_bytes_per_token / 1024:.0f} KiB per token per GPU; {e.kv_tokens:,} tokens fit "
            f"(needs {e.kv_tokens_needed:,})",
            f"engine limits      max batch {self.max_batch_size}, max seq len {self.max_seq_len:,}, "
            f"max tokens per step {self.max_num_tokens:,}",
            f"profile            {self.profile_id}",
        ])


def choose_precision(dtype: str, gpu: Gpu) -> str:
    fp8_capable = gpu.compute_capability >= FP8_MIN_CAPABILITY
    if dtype == "auto":
        return "fp8" if fp8_capable else "bf16"
    if dtype not in PRECISIONS:
        raise PlanError(f"--dtype must be auto or one of {', '.join(PRECISIONS)}, got {dtype!r}")
    if dtype == "fp8" and not fp8_capable:
        raise PlanError(f"--dtype fp8 needs sm89 or newer (Ada, Hopper, Blackwell); {gpu.name} is {gpu.architecture}")
    return dtype


def estimate(arch: ModelArch, gpu: Gpu, precision: str, tp: int, *, max_batch_size: int, max_seq_len: int,
             max_num_tokens: int, kv_cache_fraction: float) -> Estimate:
    weights = -(-weight_bytes(arch, precision) // tp)
    reserve = reserve_bytes(arch, tp, max_num_tokens)
    budget = int(max(0, gpu.memory_bytes - weights - reserve) * kv_cache_fraction)
    per_token = kv_bytes_per_token(arch, precision, tp)
    needed = max(max_seq_len, max_batch_size * min(BATCH_TOKENS_PER_SEQUENCE, max_seq_len))
    return Estimate(tp, weights, reserve, budget, per_token, budget // per_token, needed, kv_cache_fraction)


def plan_build(arch: ModelArch, gpu: Gpu, gpu_count: int, *, dtype: str = "auto", tp: int | None = None,
               max_batch_size: int = 64, max_seq_len: int | None = None, max_num_tokens: int = 8192,
               kv_cache_fraction: float = 0.9) -> BuildPlan:
    """The smallest tensor-parallel size that fits (or the one asked for), or a PlanError saying what is needed."""
    for name, value in (("--gpus", gpu_count), ("--max-batch-size", max_batch_size),
                        ("--max-num-tokens", max_num_tokens)):
        if value < 1:
            raise PlanError(f"{name} must be at least 1, got {value}")
    if not 0 < kv_cache_fraction <= 1:
        raise PlanError(f"kv_cache_fraction must be in (0, 1], got {kv_cache_fraction}")
    seq_len = max_seq_len or arch.context_length
    if not 1 <= seq_len <= arch.context_length:
        raise PlanError(f"--max-seq-len must be in 1..{arch.context_length} (the model's context), got {seq_len}")
    precision = choose_precision(dtype, gpu)
    candidates = valid_tp_sizes(arch, max(gpu_count, 64))
    if tp is not None:
        if tp not in candidates:
            raise PlanError(f"--tp {tp}: must be a power of two dividing {arch.num_heads} attention heads and "
                            f"{arch.num_kv_heads} KV heads")
        candidates = [tp]
    limits = dict(max_batch_size=max_batch_size, max_seq_len=seq_len, max_num_tokens=max_num_tokens,
                  kv_cache_fraction=kv_cache_fraction)
    estimates = [estimate(arch, gpu, precision, size, **limits) for size in candidates]
    for e in estimates:
        if e.fits and e.tp <= gpu_count:
            return BuildPlan(arch.name, arch.parameters, gpu, gpu_count, precision, e.tp, max_batch_size, seq_len,
                             max_num_tokens, kv_cache_fraction, weight_bytes(arch, precision), e)
    raise PlanError(_refusal(arch, gpu, gpu_count, precision, estimates))


def _refusal(arch: ModelArch, gpu: Gpu, gpu_count: int, precision: str, estimates: list[Estimate]) -> str:
    lines = [f"{arch.name} in {precision} ({weight_bytes(arch, precision) / 1e9:.0f} GB of weights) does not fit on "
             f"{gpu_count} x {gpu.describe()}:"]
    for e in estimates:
        if e.tp > gpu_count and e.fits:
            lines.append(f"  tp {e.tp}: would fit, but needs {e.tp} GPUs")
        elif not e.fits:
            lines.append(f"  tp {e.tp}: {e.weights_per_gpu / GIB:.1f} GiB of weights per GPU leave room for "
                         f"{e.kv_tokens:,} KV tokens, needs {e.kv_tokens_needed:,} "
                         f"(a GPU of {e.memory_needed_per_gpu / GIB:.0f} GiB)")
    smallest = next((e for e in estimates if e.fits), None)
    if smallest is not None:
        lines.append(f"needs {smallest.tp} x {gpu.name} (--gpus {smallest.tp})")
    elif precision != "fp8":
        lines.append("no tensor-parallel size fits; try fp8 on sm89 or newer, or a shorter --max-seq-len")
    else:
        lines.append("no tensor-parallel size fits; try a shorter --max-seq-len or a smaller --max-batch-size")
    return "\n".join(lines)
