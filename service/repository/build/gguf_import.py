"""Imports a GGUF file (llama.cpp's and Ollama's format) into the model repository, for the reference engine.

    python build_engine.py --model SmolLM2-135M-Instruct.Q4_1.gguf [--name smollm2-135m-instruct]

The result is an ordinary model folder: `manifest.json` and a Hugging Face
checkpoint (model.safetensors, config.json, generation_config.json with every
end-of-generation id the file declares, tokenizer.json, and
tokenizer_config.json holding the file's own `tokenizer.chat_template`).

The file is read with gguf-py alone, a tensor at a time: no model is loaded
through transformers (whose GGUF loader needs accelerate and then refuses to
save what it loaded). Quantized tensors are dequantized to float32, which keeps
their values exactly; the reference engine cannot compute on GGUF's blocks.

The tokenizer comes from transformers' GGUF tokenizer conversion, with one fix:
llama.cpp splits every digit on its own before byte-level BPE for some
vocabularies (`tokenizer.ggml.pre` smollm, starcoder, ...), which that
conversion leaves out; without it, numbers tokenize differently from the
model's training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from tqdm import tqdm

from service.repository.build.gguf_llama import (
    ROPE_FREQS,
    GGUFImportError,
    check,
    eos_token_ids,
    expected_shapes,
    field,
    hf_tensor,
    llama_config,
)
from service.repository.manifest import ModelManifest, load_manifest, write_manifest

# llama.cpp pre-tokenizers (llama-vocab.cpp) whose first split is every digit on its own.
DIGIT_SPLIT_PRE_TOKENIZERS = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
# The quantization label llama.cpp's tools append to file names: Model.Q4_K_M.gguf, model-f16.gguf.
_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|B?F16|F32)$", re.IGNORECASE)


def default_name(gguf_path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`."""
    return _QUANT_SUFFIX.sub("", gguf_path.stem).lower()


def _weights(reader: GGUFReader, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor, dequantized, under Hugging Face names; names and shapes checked against the config."""
    tensors = [t for t in reader.tensors if t.name != ROPE_FREQS]  # folded into config.rope_scaling
    weights = dict(hf_tensor(t, config) for t in tqdm(tensors, desc="dequantizing", unit="tensor"))
    expected = expected_shapes(config)
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        raise GGUFImportError(f"the tensors do not make a Llama: missing {missing[:3]}, unexpected {unexpected[:3]}")
    wrong = [f"{name} {tuple(weights[name].shape)} (expected {shape})" for name, shape in expected.items()
             if tuple(weights[name].shape) != shape]
    if wrong:
        raise GGUFImportError(f"tensor shapes do not fit the metadata: {', '.join(wrong[:3])}")
    return weights


def _token(reader: GGUFReader, token_id: int | None) -> str | None:
    return None if token_id is None else str(reader.fields["tokenizer.ggml.tokens"].contents(token_id))


def write_tokenizer(gguf_path: Path, reader: GGUFReader, config: dict[str, Any], checkpoint: Path) -> None:
    """tokenizer.json (transformers' conversion of the file's vocabulary) and tokenizer_config.json."""
    from transformers import AutoTokenizer  # the conversion needs it; the rest of the import does not

    kind = field(reader, "tokenizer.ggml.model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise GGUFImportError(f"tokenizer.ggml.model {kind!r} is not supported: transformers cannot convert it "
                              f"({e})") from None
    if not tokenizer.is_fast:
        raise GGUFImportError(f"tokenizer.ggml.model {kind!r} is not supported: transformers converted it to a slow "
                              f"tokenizer ({type(tokenizer).__name__})")
    backend = tokenizer.backend_tokenizer
    if kind == "gpt2" and field(reader, "tokenizer.ggml.pre") in DIGIT_SPLIT_PRE_TOKENIZERS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         backend.pre_tokenizer])
    backend.save(str(checkpoint / "tokenizer.json"))
    template = field(reader, "tokenizer.chat_template")
    if template is None:
        print("warning: the file has no tokenizer.chat_template; set chat_template in the model's manifest.json")
    eos = eos_token_ids(reader)
    special = {"bos_token": _token(reader, config["bos_token_id"]), "eos_token": _token(reader, eos[0] if eos else None),
               "unk_token": _token(reader, field(reader, "tokenizer.ggml.unknown_token_id")),
               "pad_token": _token(reader, config["pad_token_id"])}
    _write_json(checkpoint / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in special.items() if v is not None},
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        **({"chat_template": template} if template is not None else {}),
    })


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _write_checkpoint(gguf_path: Path, reader: GGUFReader, config: dict[str, Any], checkpoint: Path) -> None:
    checkpoint.mkdir()
    _write_json(checkpoint / "config.json", config)
    _write_json(checkpoint / "generation_config.json", {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"]})
    print("converting the tokenizer (transformers' GGUF conversion)", flush=True)
    write_tokenizer(gguf_path, reader, config, checkpoint)
    weights = _weights(reader, config)
    size = sum(w.numel() * w.element_size() for w in weights.values())
    print(f"writing model.safetensors ({size / 1e6:.0f} MB, float32)", flush=True)
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})
    for file in checkpoint.iterdir():
        file.chmod(0o644)  # safetensors writes its file private


def import_gguf(gguf_path: Path, name: str | None, engines_dir: Path) -> ModelManifest:
    """Writes engines_dir/<name>; a half-written model never exists there (built aside, then renamed)."""
    started = time.monotonic()
    gguf_path = gguf_path.resolve()
    name = name or default_name(gguf_path)
    root = engines_dir.resolve() / name
    if root.exists():
        raise SystemExit(f"{root} already exists; remove it or choose another --name")
    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise SystemExit(f"{gguf_path}: not a GGUF file gguf-py can read ({e})") from None
    try:
        check(reader)
        config = llama_config(reader)
    except GGUFImportError as e:
        raise SystemExit(f"{gguf_path}: {e}") from None
    print(f"importing {gguf_path.name}: {field(reader, 'general.name') or 'a Llama'}, "
          f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, vocabulary {config['vocab_size']}, "
          f"{len(reader.tensors)} tensors", flush=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
    try:
        try:
            _write_checkpoint(gguf_path, reader, config, staging / "checkpoint")
        except GGUFImportError as e:
            raise SystemExit(f"{gguf_path}: {e}") from None
        manifest = ModelManifest(root=staging, name=name, backend="reference",
                                 context_length=config["max_position_embeddings"], checkpoint=staging / "checkpoint",
                                 owned_by=str(field(reader, "general.organization") or "local"),
                                 created=int(time.time()), extra={"source": gguf_path.name})
        write_manifest(manifest)
        staging.chmod(0o755)  # mkdtemp made it private
        os.rename(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"added {gguf_path.name} as model {name!r} in {root} ({time.monotonic() - started:.1f} s)")
    return load_manifest(root)
