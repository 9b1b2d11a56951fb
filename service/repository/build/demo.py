"""The demo model: a small Llama 3.1-style checkpoint built offline, in seconds, byte for byte the same each run.

No model hub is reachable where llmserve is built and tested, so the demo
model is made here: seeded random weights in Hugging Face's Llama layout, a
byte-level BPE tokenizer trained on the Python standard library's own source
(text every machine with Python has), and the Llama 3.1 chat template. Every
part of the service runs on it. Its weights are random, so its answers are
random text.
"""

from __future__ import annotations

import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from service.models.template import TEMPLATES
from service.repository.manifest import ModelManifest, write_manifest

TEMPLATE = TEMPLATES / "llama-3.1-instruct.jinja"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
CONTEXT_LENGTH = 2048
CREATED = 1_764_000_000  # fixed, so that the build is reproducible
CONFIG = {
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


def random_weights() -> dict[str, torch.Tensor]:
    """Hugging Face Llama parameter names, normal(0, 0.02) like its initializer, norms at 1."""
    gen = torch.Generator().manual_seed(0)
    c = CONFIG
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
    weights["lm_head.weight"] = normal(c["vocab_size"], hidden)
    return weights


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_checkpoint(checkpoint: Path) -> None:
    checkpoint.mkdir(parents=True)
    tokenizer = train_tokenizer()
    assert tokenizer.get_vocab_size() == CONFIG["vocab_size"], tokenizer.get_vocab_size()
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    _write_json(checkpoint / "config.json", CONFIG)
    _write_json(checkpoint / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [4, 1]})
    _write_json(checkpoint / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "model_max_length": CONTEXT_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": TEMPLATE.read_text(),
    })
    _write_json(checkpoint / "special_tokens_map.json", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    save_file(random_weights(), str(checkpoint / "model.safetensors"), metadata={"format": "pt"})


def build_demo(out_dir: Path) -> ModelManifest:
    """Writes the demo model to out_dir; a half-written model never exists there (built aside, then renamed)."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=out_dir.parent))
    try:
        write_checkpoint(staging / "checkpoint")
        manifest = ModelManifest(root=staging, name="demo", backend="reference", owned_by="llmserve",
                                 context_length=CONTEXT_LENGTH, checkpoint=staging / "checkpoint", created=CREATED)
        write_manifest(manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote the demo model to {out_dir} (random weights: its answers are random text)")
    return ModelManifest(root=out_dir, name="demo", backend="reference", owned_by="llmserve",
                         context_length=CONTEXT_LENGTH, checkpoint=out_dir / "checkpoint", created=CREATED)
