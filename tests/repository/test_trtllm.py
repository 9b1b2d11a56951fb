"""TensorRT-LLM where it cannot run: engine builds against a fake `tensorrt_llm`, and `llmserve trtllm-worker`,
which runs TensorRT-LLM's gRPC server on the profile that fits, checked by the command it would run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from service.config import TrtllmConfig
from service.repository.gpus import detect_gpus, parse_gpu
from service.repository.manifest import load_manifest
from service.repository.profiles import load_profile
from service.repository.trtllm_worker import llm_options, worker_command
from tests.repository.fake_tensorrt_llm import (
    LLM_ARGS_FIELDS,
    FakeLLMConstructor,
    FakeTrtLLM,
    fake_tensorrt_llm_modules,
)

ROOT = Path(__file__).resolve().parents[2]
ENGINE_PROFILE = {"id": "tensorrt-sm90-fp8-tp1", "runtime": "tensorrt", "gpu_architecture": "sm90",
                  "gpu_name": "H100-80GB", "precision": "fp8", "tensor_parallel_size": 1,
                  "min_gpu_memory_bytes": 1 << 30, "tensorrt_llm_version": "1.2.0", "tensorrt_version": "10.13",
                  "max_batch_size": 8, "max_seq_len": 2048, "max_num_tokens": 8192}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def write_engine_model(engines: Path, checkpoint: Path, name: str = "trt") -> Path:
    model = engines / name
    (model / "profiles" / ENGINE_PROFILE["id"]).mkdir(parents=True)
    (model / "checkpoint").symlink_to(checkpoint.resolve(), target_is_directory=True)
    (model / "manifest.json").write_text(json.dumps({"name": name, "backend": "tensorrt-llm", "context_length": 2048,
                                                     "checkpoint": "checkpoint", "profiles": "profiles"}))
    (model / "profiles" / ENGINE_PROFILE["id"] / "profile.json").write_text(json.dumps(ENGINE_PROFILE))
    return model


def test_worker_runs_trtllm_serve_grpc_on_an_engine(tmp_path: Path, engines_dir: Path) -> None:
    model = write_engine_model(tmp_path, engines_dir / "demo" / "checkpoint")
    profile = load_profile(model / "profiles" / ENGINE_PROFILE["id"])
    config = TrtllmConfig(trt_max_batch_size=64, trt_max_num_tokens=4096, trt_kv_cache_fraction=0.8,
                          trt_block_reuse=False, trt_chunked_prefill=True)
    command = worker_command(load_manifest(model), profile, config, "0.0.0.0", 50061, tmp_path / "o.yaml")
    assert command[:5] == [sys.executable, "-m", "tensorrt_llm.commands.serve", str(profile.path), "--grpc"]
    flags = dict(zip(command[5::2], command[6::2], strict=False))
    assert flags["--backend"] == "tensorrt" and flags["--tokenizer"] == str(model / "checkpoint")
    assert (flags["--host"], flags["--port"], flags["--tp_size"]) == ("0.0.0.0", "50061", "1")
    assert (flags["--max_batch_size"], flags["--max_num_tokens"]) == ("8", "4096"), "capped at the engine's"
    assert command[-1] == "--enable_chunked_prefill"
    options = llm_options(profile, config)
    assert set(options) <= LLM_ARGS_FIELDS, "trtllm-serve hands them to the LLM constructor, which forbids others"
    assert options["kv_cache_config"] == {"free_gpu_memory_fraction": 0.8, "enable_block_reuse": False}
    assert options["guided_decoding_backend"] == "xgrammar" and options["gather_generation_logits"] is True
    assert options["max_input_len"] == 2048


def test_worker_cli_chooses_the_pytorch_profile_for_the_described_gpus(tmp_path: Path) -> None:
    built = _run("build_engine.py", "--model", str(ROOT / "engines" / "demo" / "checkpoint"), "--name", "tiny",
                 "--backend", "pytorch", "--gpu", "L4", "--engines-dir", str(tmp_path))
    assert built.returncode == 0, built.stderr
    shown = _run("-m", "service", "trtllm-worker", "tiny", "--engines-dir", str(tmp_path), "--gpu", "H100-80GB",
                 "--trtllm-version", "1.3.0", "--host", "0.0.0.0", "--port", "50061", "--print")
    assert shown.returncode == 0, shown.stderr
    command, _, options = shown.stdout.partition("\n")
    profile = tmp_path / "tiny" / "profiles" / "pytorch-sm80-bf16-tp1"
    assert f"-m tensorrt_llm.commands.serve {profile / 'model'} --grpc --host 0.0.0.0 --port 50061" in command
    assert "--backend pytorch" in command and f"--tokenizer {tmp_path / 'tiny' / 'checkpoint'}" in command
    options = json.loads(options)
    assert set(options) <= LLM_ARGS_FIELDS and options["dtype"] == "bfloat16"
    refused = _run("-m", "service", "trtllm-worker", "tiny", "--engines-dir", str(tmp_path), "--gpu", "A100-80GB",
                   "--trtllm-version", "1.2.0", "--print")
    assert refused.returncode == 2 and "needs TensorRT-LLM 1.3 or later" in refused.stderr
    missing = _run("-m", "service", "trtllm-worker", "nope", "--engines-dir", str(tmp_path), "--print")
    assert missing.returncode == 2 and "no model 'nope'" in missing.stderr


@pytest.fixture
def fake_tensorrt_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, module in fake_tensorrt_llm_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(FakeLLMConstructor, "created", [])


def test_engine_build_drives_the_llm_api(fake_tensorrt_llm: None, engines_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from service.repository.build import trtllm as build_trtllm

    monkeypatch.setattr(build_trtllm, "detect_gpus", lambda: [parse_gpu("H100-80GB")] * 2)
    args = SimpleNamespace(model=str(engines_dir / "demo" / "checkpoint"), name="tiny", engines_dir=tmp_path,
                           backend="tensorrt-llm", plan=False, gpu=None, gpus=None, dtype="auto", tp=None,
                           max_batch_size=8, max_seq_len=1024, max_num_tokens=2048)
    assert build_trtllm.run(args) == 0
    [llm] = FakeLLMConstructor.created
    assert isinstance(llm, FakeTrtLLM) and llm.shut_down
    assert llm.kwargs["build_config"].kwargs == {"max_batch_size": 8, "max_seq_len": 1024, "max_input_len": 1024,
                                                 "max_num_tokens": 2048}
    assert llm.kwargs["quant_config"].kwargs == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    assert (llm.kwargs["tensor_parallel_size"], llm.kwargs["dtype"]) == (1, "auto")
    profile = load_profile(tmp_path / "tiny" / "profiles" / "tensorrt-sm90-fp8-tp1")
    assert (profile.tensorrt_llm_version, profile.data["tensorrt_version"]) == ("1.2.0", "10.13.2")
    assert "rank0.engine" in profile.data["checksum"]["files"]


@pytest.mark.gpu
@pytest.mark.skipif(not detect_gpus(), reason="no NVIDIA GPU")
def test_plan_for_the_detected_gpus() -> None:
    done = _run("build_engine.py", "--plan", "--model", "llama-3.1-70b-instruct")
    gpu = detect_gpus()[0]
    assert done.returncode in (0, 2), done.stderr
    assert gpu.architecture in done.stdout + done.stderr
