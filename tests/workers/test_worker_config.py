"""Where a model's workers are declared: --worker (repeatable), LLMSERVE_WORKERS, a manifest's "workers"; and the
errors that name what is wrong before anything starts."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.backends.workers.address import (
    KINDS,
    WorkerAddress,
    WorkerAddressError,
    parse_address,
    parse_model_workers,
)
from service.backends.workers.kinds import CLIENTS
from service.config import add_config_arguments, config_from_args
from service.models.registry import ModelRegistry
from service.repository.manifest import ManifestError, load_manifest
from tests.helpers import ROOT, worker_config


def parse(argv: list[str]) -> object:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_every_kind_has_a_client() -> None:
    assert set(CLIENTS) == set(KINDS) == {"trtllm", "vllm", "sglang"}


def test_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse([]).workers.workers == []
    config = parse(["--worker", "a=vllm://h:1", "--worker", "a=vllm://h:2", "--worker-probe-interval", "0.5"])
    assert config.workers.workers == ["a=vllm://h:1", "a=vllm://h:2"] and config.workers.worker_probe_interval == 0.5
    monkeypatch.setenv("LLMSERVE_WORKERS", "m=trtllm://gpu-0:50051,m=trtllm://gpu-1:50051")
    models = parse_model_workers(parse([]).workers.workers)
    assert models == {"m": [WorkerAddress("trtllm", "gpu-0", 50051), WorkerAddress("trtllm", "gpu-1", 50051)]}
    assert parse(["--worker", "x=sglang://[::1]:9"]).workers.workers == ["x=sglang://[::1]:9"]   # the flag wins
    assert parse_address("sglang://[::1]:9").target == "[::1]:9"


@pytest.mark.parametrize(("spec", "why"), [
    ("m=grpc://h:1", "worker kind 'grpc' is not one of trtllm, vllm, sglang"),
    ("m=vllm://h", "is not KIND://HOST:PORT"),
    ("m=vllm://h:70000", "port 70000 is out of range"),
    ("vllm://h:1", "is not NAME=KIND://HOST:PORT"),
])
def test_bad_worker_values_are_refused_naming_them(spec: str, why: str) -> None:
    with pytest.raises(WorkerAddressError, match=why):
        parse_model_workers([spec])
    with pytest.raises(WorkerAddressError, match="given twice"):
        parse_model_workers(["m=vllm://h:1", "m=vllm://h:1"])


def test_serve_stops_on_a_bad_worker_flag_in_one_line(tmp_path: Path) -> None:
    served = subprocess.run([sys.executable, "-m", "service", "serve", "--engines-dir", str(tmp_path), "--worker",
                             "m=vllm:/h:1", "--grpc-port", "0", "--http-port", "0"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert served.returncode == 1 and "Traceback" not in served.stderr
    assert "--worker: 'vllm:/h:1' is not KIND://HOST:PORT" in served.stderr, served.stderr


def test_a_manifest_lists_workers_and_the_flag_adds_to_them(tmp_path: Path, engines_dir: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "checkpoint").symlink_to((engines_dir / "demo" / "checkpoint").resolve(), target_is_directory=True)
    manifest = {"backend": "workers", "context_length": 4096, "checkpoint": "checkpoint",
                "workers": ["vllm://a:1"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert load_manifest(folder).workers == (WorkerAddress("vllm", "a", 1),)
    registry = ModelRegistry(worker_config(tmp_path, "m=vllm://b:2", "solo=sglang://c:3"))
    assert registry.names == ["m", "solo"]
    assert [str(w) for w in registry._workers["m"]] == ["vllm://a:1", "vllm://b:2"]
    (folder / "manifest.json").write_text(json.dumps({**manifest, "workers": ["vllm://a"]}))
    with pytest.raises(ManifestError, match="workers: 'vllm://a' is not KIND://HOST:PORT"):
        load_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({**manifest, "workers": [1]}))
    with pytest.raises(ManifestError, match="must be a list of"):
        load_manifest(folder)


def test_workers_of_one_model_are_of_one_kind(tmp_path: Path) -> None:
    from service.backends.workers.engine import WorkerEngine
    from service.config import WorkersConfig

    with pytest.raises(ValueError, match="must be of one kind, got sglang, vllm"):
        WorkerEngine("m", [parse_address("vllm://a:1"), parse_address("sglang://b:2")], None, WorkersConfig())
