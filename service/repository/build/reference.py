"""Adds a local Hugging Face Llama checkpoint to the model repository, served by the reference engine."""

from __future__ import annotations

import json
from pathlib import Path

from service.repository.manifest import ModelManifest, write_manifest

LLAMA_ARCHITECTURES = {"LlamaForCausalLM"}


def check_checkpoint(src: Path) -> dict:
    """The checkpoint's config, or SystemExit naming what is missing or unsupported."""
    if not src.is_dir():
        raise SystemExit(f"{src}: not a directory")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"{src}: no config.json; is this a Hugging Face checkpoint folder?")
    config = json.loads(config_path.read_text())
    architectures = set(config.get("architectures") or [])
    if config.get("model_type") != "llama" and not architectures & LLAMA_ARCHITECTURES:
        raise SystemExit(f"{src}: model_type {config.get('model_type')!r} / architectures {sorted(architectures)} "
                         "is not a Llama architecture; the reference engine serves Llama-family checkpoints")
    if not list(src.glob("*.safetensors")):
        raise SystemExit(f"{src}: no .safetensors weights (convert .bin checkpoints to safetensors first)")
    if not (src / "tokenizer.json").is_file() and not (src / "tokenizer.model").is_file():
        raise SystemExit(f"{src}: no tokenizer (tokenizer.json or tokenizer.model)")
    return config


def _owner(config: dict) -> str:
    """Where the checkpoint came from, as its config records it: `_name_or_path` (transformers 4),
    `_model_name_or_path` (transformers 5); "local" when neither says."""
    return str(config.get("_name_or_path") or config.get("_model_name_or_path") or "local")


def import_checkpoint(src: Path, name: str, engines_dir: Path) -> ModelManifest:
    src = src.resolve()
    config = check_checkpoint(src)
    root = engines_dir.resolve() / name
    if root.exists():
        raise SystemExit(f"{root} already exists; remove it or choose another --name")
    root.mkdir(parents=True)
    (root / "checkpoint").symlink_to(src, target_is_directory=True)
    manifest = ModelManifest(root=root, name=name, backend="reference",
                             context_length=int(config.get("max_position_embeddings", 4096)),
                             checkpoint=root / "checkpoint", owned_by=_owner(config))
    write_manifest(manifest)
    print(f"added {src} as model {name!r} in {root}")
    return manifest
