"""Profile selection against described GPUs, and `llmserve profiles`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.repository.gpus import GIB, parse_gpu
from service.repository.profiles import ProfileError, load_profile, load_profiles, profile_by_id, select_profile

ROOT = Path(__file__).resolve().parents[2]
H100, A100, L40S = parse_gpu("H100-80GB"), parse_gpu("A100-80GB"), parse_gpu("L40S")


def write_profile(profiles_dir: Path, profile_id: str, **fields: Any) -> Path:
    data: dict[str, Any] = {
        "id": profile_id, "runtime": "tensorrt", "gpu_architecture": "sm90", "gpu_name": "H100-80GB",
        "precision": "fp8", "tensor_parallel_size": 2, "min_gpu_memory_bytes": 60 * GIB,
        "tensorrt_llm_version": "1.2.0", "tensorrt_version": "10.13.2", "max_batch_size": 64,
        "max_seq_len": 131072, "max_num_tokens": 8192,
    }
    data.update(fields)
    folder = profiles_dir / profile_id
    folder.mkdir(parents=True)
    (folder / "profile.json").write_text(json.dumps(data))
    return folder


@pytest.fixture
def profiles(tmp_path: Path) -> list:
    write_profile(tmp_path, "sm90-bf16-tp4", precision="bf16", tensor_parallel_size=4)
    write_profile(tmp_path, "sm90-fp8-tp4", tensor_parallel_size=4)
    write_profile(tmp_path, "sm90-fp8-tp2")
    write_profile(tmp_path, "sm80-bf16-tp4", gpu_architecture="sm80", precision="bf16", tensor_parallel_size=4)
    return load_profiles(tmp_path)


def test_fp8_then_smallest_tp_is_chosen(profiles: list) -> None:
    assert select_profile("m", profiles, [H100] * 8, "1.2.0").id == "sm90-fp8-tp2"
    only_bf16 = [p for p in profiles if p.precision == "bf16"]
    assert select_profile("m", only_bf16, [H100] * 4, "1.2.0").id == "sm90-bf16-tp4"


def test_architecture_must_match(profiles: list) -> None:
    assert select_profile("m", profiles, [A100] * 4, "1.2.1").id == "sm80-bf16-tp4"
    with pytest.raises(ProfileError) as e:
        select_profile("m", profiles, [L40S] * 8, "1.2.0")
    assert "sm90-fp8-tp2: needs sm90; found sm89" in str(e.value)


def test_too_few_gpus(profiles: list) -> None:
    with pytest.raises(ProfileError) as e:
        select_profile("m", profiles, [H100], "1.2.0")
    message = str(e.value)
    assert "found H100-80GB (sm90, 79.6 GiB); TensorRT-LLM 1.2.0" in message
    assert "sm90-fp8-tp2: needs 2 GPUs of sm90, found 1" in message
    assert "sm80-bf16-tp4: needs sm80; found sm90" in message


def test_tensorrt_llm_major_minor_must_match(profiles: list) -> None:
    assert select_profile("m", profiles, [H100] * 2, "1.2.1").id == "sm90-fp8-tp2"
    with pytest.raises(ProfileError, match=r"built with TensorRT-LLM 1.2.0, installed 1.3.0rc5 \(engines load only"):
        select_profile("m", profiles, [H100] * 2, "1.3.0rc5")
    with pytest.raises(ProfileError, match="TensorRT-LLM is not installed"):
        select_profile("m", profiles, [H100] * 2, None)


def test_memory_per_gpu_must_suffice(tmp_path: Path) -> None:
    write_profile(tmp_path, "big", min_gpu_memory_bytes=100 * GIB, tensor_parallel_size=1)
    with pytest.raises(ProfileError, match=r"big: needs 100\.0 GiB per GPU, H100-80GB has 79\.6 GiB"):
        select_profile("m", load_profiles(tmp_path), [H100], "1.2.0")
    assert select_profile("m", load_profiles(tmp_path), [parse_gpu("H200")], "1.2.0").id == "big"


def test_no_gpu_is_named(profiles: list) -> None:
    with pytest.raises(ProfileError, match=r"found no NVIDIA GPU; TensorRT-LLM 1\.2\.0"):
        select_profile("m", profiles, [], "1.2.0")


def test_pytorch_profiles_need_1_3_and_run_on_newer_architectures(tmp_path: Path) -> None:
    write_profile(tmp_path, "pytorch-sm89-fp8-tp1", runtime="pytorch", gpu_architecture="sm89",
                  tensor_parallel_size=1, tensorrt_llm_version="1.3", tensorrt_version=None)
    found = load_profiles(tmp_path)
    assert select_profile("m", found, [H100], "1.3.0").id == "pytorch-sm89-fp8-tp1"
    with pytest.raises(ProfileError, match=r"needs TensorRT-LLM 1\.3 or later, installed 1\.2\.0"):
        select_profile("m", found, [H100], "1.2.0")
    with pytest.raises(ProfileError, match="needs sm89 or newer; found sm80"):
        select_profile("m", found, [A100], "1.3.1")


def test_engine_profile_is_preferred_to_pytorch_when_both_fit(tmp_path: Path) -> None:
    """1.3.0 release candidates up to rc20 still have the TensorRT flow, so both kinds can fit there."""
    write_profile(tmp_path, "a-pytorch", runtime="pytorch", tensorrt_llm_version="1.3")
    write_profile(tmp_path, "b-tensorrt", tensorrt_llm_version="1.3.0rc10")
    assert select_profile("m", load_profiles(tmp_path), [H100] * 2, "1.3.0rc15").id == "b-tensorrt"
    assert select_profile("m", load_profiles(tmp_path), [H100] * 2, "1.4.0").id == "a-pytorch"


def test_profile_by_id(profiles: list) -> None:
    assert profile_by_id("m", profiles, "sm90-fp8-tp4").tensor_parallel_size == 4
    with pytest.raises(ProfileError, match="--trt-profile: model 'm' has no profile 'x'; profiles: sm80-bf16-tp4"):
        profile_by_id("m", profiles, "x")


def test_bad_profiles_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="'precision' must be one of fp8, bf16, fp16, got 'int4'"):
        load_profile(write_profile(tmp_path, "a", precision="int4"))
    with pytest.raises(ProfileError, match="'tensor_parallel_size' must be a int, got '2'"):
        load_profile(write_profile(tmp_path, "b", tensor_parallel_size="2"))
    with pytest.raises(ProfileError, match="gpu_architecture must look like sm90, got 'hopper'"):
        load_profile(write_profile(tmp_path, "c", gpu_architecture="hopper"))
    with pytest.raises(ProfileError, match="no profiles folder"):
        load_profiles(tmp_path / "missing")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_built_profile_is_listed_and_chosen_by_the_cli(tmp_path: Path) -> None:
    """A pytorch-runtime profile written by build_engine.py, then listed by `llmserve profiles`."""
    built = _run("build_engine.py", "--model", str(ROOT / "engines" / "demo" / "checkpoint"), "--name", "tiny",
                 "--backend", "pytorch", "--gpu", "L4", "--engines-dir", str(tmp_path))
    assert built.returncode == 0, built.stderr
    profile = json.loads((tmp_path / "tiny" / "profiles" / "pytorch-sm80-bf16-tp1" / "profile.json").read_text())
    assert profile["runtime"] == "pytorch" and profile["gpu_architecture"] == "sm80", "bf16 runs from Ampere on"
    assert profile["precision"] == "bf16", "the PyTorch backend serves the checkpoint's own precision"
    assert len(profile["checksum"]["digest"]) == 64
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt-llm" and manifest["profiles"] == "profiles"
    assert (tmp_path / "tiny" / "checkpoint" / "tokenizer.json").is_file()

    chosen = _run("-m", "service", "profiles", "--engines-dir", str(tmp_path), "--gpu", "H100-80GB",
                  "--trtllm-version", "1.3.0")
    assert chosen.returncode == 0, chosen.stderr
    assert "machine: H100-80GB (sm90, 79.6 GiB); TensorRT-LLM 1.3.0" in chosen.stdout
    assert "pytorch-sm80-bf16-tp1" in chosen.stdout and "* chosen" in chosen.stdout
    refused = _run("-m", "service", "profiles", "--engines-dir", str(tmp_path), "--gpu", "A100-80GB",
                   "--trtllm-version", "1.2.0")
    assert "no: needs TensorRT-LLM 1.3 or later, installed 1.2.0" in refused.stdout
    assert "none fits this machine" in refused.stdout


def test_serve_sends_a_tensorrt_llm_model_to_its_worker_in_one_line(tmp_path: Path) -> None:
    """TensorRT-LLM profiles are served by a worker (llmserve trtllm-worker): without one the server says so,
    exits 1, shows no traceback."""
    built = _run("build_engine.py", "--model", str(ROOT / "engines" / "demo" / "checkpoint"), "--name", "tiny",
                 "--backend", "pytorch", "--gpu", "L4", "--engines-dir", str(tmp_path))
    assert built.returncode == 0, built.stderr
    served = _run("-m", "service", "serve", "--engines-dir", str(tmp_path), "--grpc-port", "0", "--http-port", "0",
                  "--host", "127.0.0.1")
    assert served.returncode == 1
    assert "Traceback" not in served.stderr
    assert "cannot serve" in served.stderr and "llmserve trtllm-worker tiny" in served.stderr, served.stderr
    assert "--worker tiny=trtllm://HOST:PORT" in served.stderr
