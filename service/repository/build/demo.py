"""The demo models: small Llama 3.1-style checkpoints built offline, in seconds, byte for byte the same each run.

No model hub is reachable where llmserve is built and tested, so the demo
models are made here: seeded random weights in Hugging Face's Llama layout, the
Llama 3.1 chat template, and one of two tokenizers:

- `demo` (the model `make serve` serves): a byte-level BPE tokenizer trained on
  the Python standard library's own source (text every machine with Python
  has), with Llama 3's chat special tokens. Small and fast; its ids are its own.
- `llama-3.1` (`demo-llama-3.1`): Meta's own Llama 3 tokenizer, converted
  (service/repository/build/llama3_tokenizer.py), every special token at Meta's
  id, and the three end-of-turn ids of Llama 3.1's generation_config.json. Its
  prompts are the token ids the real Llama 3.1 models are given, which the tests
  check against Meta's reference tokenizer.

Every part of the service runs on either. Their weights are random, so their
answers are random text. The llama-3.1 demo ends its turns like a chat model
(about one token in 25 is an end-of-turn id, each of the three alike): every
embedding has a constant component along one direction, and the end-of-turn
ids' (tied) output rows a larger one, so that their logits stand out whatever
the context. That is what lets the tests see each end-of-turn id end a choice.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from service.models.template import TEMPLATES
from service.repository.build import llama3_tokenizer
from service.repository.manifest import ModelManifest, write_manifest

TEMPLATE = TEMPLATES / "llama-3.1-instruct.jinja"
TOKENIZERS = ("demo", "llama-3.1")
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
CONTEXT_LENGTH = 2048
CREATED = 1_764_000_000  # fixed, so that the build is reproducible
CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": CONTEXT_LENGTH,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 1024},
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": [4, 1],
    "torch_dtype": "float32",
}
# Meta's 128,256 tokens: a narrower model with tied embeddings keeps the checkpoint near 70 MB.
LLAMA_3_1_CONFIG: dict[str, Any] = {
    **CONFIG,
    "vocab_size": llama3_tokenizer.VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "bos_token_id": llama3_tokenizer.SPECIAL_TOKEN_IDS[llama3_tokenizer.BOS],
    "eos_token_id": [llama3_tokenizer.SPECIAL_TOKEN_IDS[t] for t in llama3_tokenizer.END_OF_TURN],
}
# The llama-3.1 demo's end-of-turn bias (see the module docstring): the embeddings' component along direction 0,
# and the end-of-turn ids' own.
_COMMON_COMPONENT, _END_OF_TURN_COMPONENT = 0.5, 2.0
CORPUS_FILES = 120  # the first files of the sorted standard library: enough for 4k merges, trained in seconds


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())[:CORPUS_FILES]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"], special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer)
    # Like Llama 3: BOS is added when encoding plain text with special tokens; chat templates write it themselves.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0)])
    return tokenizer


def random_weights(config: dict[str, Any], end_of_turn: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face Llama parameter names, normal(0, 0.02) like its initializer, norms at 1; with end_of_turn, those
    ids made likely at every step (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    c = config
    hidden, inter, head_dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_dim, kv_dim = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * c["initializer_range"]

    weights = {"model.embed_tokens.weight": normal(c["vocab_size"], hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": normal(q_dim, hidden),
            p + "self_attn.k_proj.weight": normal(kv_dim, hidden),
            p + "self_attn.v_proj.weight": normal(kv_dim, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, q_dim),
            p + "mlp.gate_proj.weight": normal(inter, hidden),
            p + "mlp.up_proj.weight": normal(inter, hidden),
            p + "mlp.down_proj.weight": normal(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
        }
    weights["model.norm.weight"] = torch.ones(hidden)
    if not c["tie_word_embeddings"]:
        weights["lm_head.weight"] = normal(c["vocab_size"], hidden)
    if end_of_turn:
        output = weights["model.embed_tokens.weight" if c["tie_word_embeddings"] else "lm_head.weight"]
        weights["model.embed_tokens.weight"][:, 0] = _COMMON_COMPONENT
        output[end_of_turn, 0] = _END_OF_TURN_COMPONENT
    return weights


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_tokenizer_files(checkpoint: Path, tokenizer: Tokenizer, model_max_length: int) -> None:
    """tokenizer.json and the Instruct checkpoints' tokenizer_config.json (EOS <|eot_id|>, llmserve's template)."""
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    _write_json(checkpoint / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": TEMPLATE.read_text(),
    })
    _write_json(checkpoint / "special_tokens_map.json", special)


def write_checkpoint(checkpoint: Path, tokenizer_kind: str = "demo") -> None:
    checkpoint.mkdir(parents=True)
    if tokenizer_kind == "llama-3.1":
        started = time.monotonic()
        print("converting Meta's Llama 3 tokenizer (llama-models' llama3/tokenizer.model) ...", flush=True)
        tokenizer, config = llama3_tokenizer.build_tokenizer(), LLAMA_3_1_CONFIG
        print(f"converted in {time.monotonic() - started:.1f}s: {tokenizer.get_vocab_size()} tokens", flush=True)
        weights = random_weights(config, end_of_turn=config["eos_token_id"])
    else:
        tokenizer, config = train_tokenizer(), CONFIG
        weights = random_weights(config)
    assert tokenizer.get_vocab_size() == config["vocab_size"], tokenizer.get_vocab_size()
    _write_tokenizer_files(checkpoint, tokenizer, CONTEXT_LENGTH)
    _write_json(checkpoint / "config.json", config)
    _write_json(checkpoint / "generation_config.json",
                {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})


def build_demo(out_dir: Path, tokenizer: str = "demo", name: str | None = None) -> ModelManifest:
    """Writes a demo model to out_dir, served as `name` (default: the folder's name); a half-written model never
    exists there (built aside, then renamed)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown demo tokenizer {tokenizer!r}; one of {', '.join(TOKENIZERS)}")
    out_dir = out_dir.resolve()
    name = name or out_dir.name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out_dir.parent))
    try:
        write_checkpoint(staging / "checkpoint", tokenizer)
        manifest = ModelManifest(root=staging, name=name, backend="reference", owned_by="llmserve",
                                 context_length=CONTEXT_LENGTH, checkpoint=staging / "checkpoint", created=CREATED)
        write_manifest(manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote the demo model {name!r} to {out_dir} ({tokenizer} tokenizer; random weights: its answers are "
          "random text)")
    return ModelManifest(root=out_dir, name=name, backend="reference", owned_by="llmserve",
                         context_length=CONTEXT_LENGTH, checkpoint=out_dir / "checkpoint", created=CREATED)
