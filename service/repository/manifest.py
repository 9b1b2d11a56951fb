"""The model manifest: `engines/<name>/manifest.json`, one per served model.

It names the backend and where the tokenizer and weights are, so that a model
folder is self-describing and the server needs no per-model flags.

    {
      "name": "demo",                  # the id requests use
      "backend": "reference",          # or "tensorrt-llm"
      "owned_by": "llmserve",
      "context_length": 2048,
      "checkpoint": "checkpoint",      # Hugging Face folder (config.json, weights, tokenizer), relative
      "chat_template": null,           # optional .jinja file overriding the tokenizer's template
      "pricing": {"prompt_per_million": 0.7, "completion_per_million": 0.9},   # optional
      "created": 1764000000,
      "profiles": "profiles",          # tensorrt-llm: folder of per-GPU-architecture engine profiles
      "workers": ["trtllm://llama-70b-0.workers:50051"]   # optional: gRPC workers serve it (any backend)
    }

A model with workers (here, or `--worker NAME=KIND://HOST:PORT`) is served by
them; its folder then only gives the tokenizer, the chat template, pricing and
an upper bound on the context. Backend "workers" is such a folder and nothing
more: a checkpoint folder holding only the tokenizer files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.backends.workers.address import WorkerAddress, WorkerAddressError, parse_address
from service.repository.json_file import read_object, typed

BACKENDS = ("reference", "tensorrt-llm", "workers")
MANIFEST = "manifest.json"


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Pricing:
    prompt_per_million: float
    completion_per_million: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_per_million + completion_tokens * self.completion_per_million) / 1e6


@dataclass(frozen=True)
class ModelManifest:
    root: Path
    name: str
    backend: str
    context_length: int
    checkpoint: Path
    owned_by: str = "llmserve"
    chat_template: Path | None = None
    pricing: Pricing | None = None
    created: int = 0
    profiles: Path | None = None
    workers: tuple[WorkerAddress, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "backend": self.backend,
            "owned_by": self.owned_by,
            "context_length": self.context_length,
            "checkpoint": str(self.checkpoint.relative_to(self.root)),
            "created": self.created,
            **self.extra,
        }
        if self.chat_template:
            out["chat_template"] = str(self.chat_template.relative_to(self.root))
        if self.pricing:
            out["pricing"] = {"prompt_per_million": self.pricing.prompt_per_million,
                              "completion_per_million": self.pricing.completion_per_million}
        if self.profiles:
            out["profiles"] = str(self.profiles.relative_to(self.root))
        if self.workers:
            out["workers"] = [str(w) for w in self.workers]
        return out


def _require(data: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    return typed(data, key, kind, where, ManifestError)


def load_manifest(model_dir: Path) -> ModelManifest:
    path = model_dir / MANIFEST
    data = read_object(path, ManifestError, f"{model_dir}: no {MANIFEST}")
    backend = _require(data, "backend", str, path)
    if backend not in BACKENDS:
        raise ManifestError(f"{path}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    context_length = _require(data, "context_length", int, path)
    if context_length < 1:
        raise ManifestError(f"{path}: context_length must be positive")
    pricing = None
    if "pricing" in data:
        p = _require(data, "pricing", dict, path)
        pricing = Pricing(float(p["prompt_per_million"]), float(p["completion_per_million"]))
    workers = _require(data, "workers", list, path) if "workers" in data else []
    try:
        addresses = tuple(parse_address(w) for w in workers if isinstance(w, str))
    except WorkerAddressError as e:
        raise ManifestError(f"{path}: workers: {e}") from None
    if len(addresses) < len(workers):
        raise ManifestError(f"{path}: 'workers' must be a list of \"KIND://HOST:PORT\" strings")
    known = {"name", "backend", "owned_by", "context_length", "checkpoint", "chat_template", "pricing", "created",
             "profiles", "workers"}
    return ModelManifest(
        root=model_dir,
        name=str(data.get("name") or model_dir.name),
        backend=backend,
        context_length=context_length,
        checkpoint=model_dir / _require(data, "checkpoint", str, path),
        owned_by=str(data.get("owned_by", "llmserve")),
        chat_template=model_dir / data["chat_template"] if data.get("chat_template") else None,
        pricing=pricing,
        created=int(data.get("created", 0)),
        profiles=model_dir / data["profiles"] if data.get("profiles") else None,
        workers=addresses,
        extra={k: v for k, v in data.items() if k not in known},
    )


def discover(engines_dir: Path) -> list[ModelManifest]:
    """Every model folder with a manifest, sorted by name; folders without one are skipped."""
    if not engines_dir.is_dir():
        raise ManifestError(f"engines directory {engines_dir} does not exist")
    manifests = [load_manifest(d) for d in sorted(engines_dir.iterdir()) if (d / MANIFEST).is_file()]
    names = [m.name for m in manifests]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ManifestError(f"{engines_dir}: more than one model named {', '.join(sorted(dupes))}")
    return manifests


def write_manifest(manifest: ModelManifest) -> None:
    (manifest.root / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
