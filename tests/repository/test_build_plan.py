"""Build planning: the 70B numbers, refusals, config.json input, GPU descriptions and the `--plan` CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.repository.build import trtllm as build_trtllm
from service.repository.build.plan import (
    TARGET_MODELS,
    PlanError,
    arch_from_config,
    checkpoint_precision,
    kv_bytes_per_token,
    load_arch,
    plan_build,
    pytorch_dtype,
    weight_bytes,
)
from service.repository.gpus import GIB, GpuError, detect_gpus, parse_gpu, parse_nvidia_smi, visible
from service.repository.manifest import load_manifest
from service.repository.profiles import load_profile

ROOT = Path(__file__).resolve().parents[2]
LLAMA31 = TARGET_MODELS["llama-3.1-70b-instruct"]


def test_70b_parameter_count_and_weight_bytes() -> None:
    assert 70.0e9 < LLAMA31.parameters < 71.0e9
    assert 138e9 < weight_bytes(LLAMA31, "fp16") < 142e9          # "about 140 GB"
    assert weight_bytes(LLAMA31, "bf16") == weight_bytes(LLAMA31, "fp16")
    assert 68e9 < weight_bytes(LLAMA31, "fp8") < 74e9              # "about 70 GB": embeddings stay 16-bit


def test_kv_bytes_per_token_is_split_over_tp() -> None:
    # 2 (K and V) x 80 layers x 8 KV heads x 128 head dim x 2 bytes
    assert kv_bytes_per_token(LLAMA31, "fp16", 1) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_bytes_per_token(LLAMA31, "fp16", 2) == 327_680 // 2
    assert kv_bytes_per_token(LLAMA31, "fp8", 1) == 327_680 // 2


@pytest.mark.parametrize("model", sorted(TARGET_MODELS))
@pytest.mark.parametrize(("gpu", "dtype", "tp"), [
    ("H200", "fp16", 2), ("H100-80GB", "fp16", 4), ("H200", "fp8", 1), ("H100-80GB", "fp8", 2),
    ("H200", "bf16", 2), ("A100-80GB", "bf16", 4),
])
def test_smallest_tp_that_fits(model: str, gpu: str, dtype: str, tp: int) -> None:
    plan = plan_build(TARGET_MODELS[model], parse_gpu(gpu), 8, dtype=dtype)
    assert (plan.precision, plan.tp) == (dtype, tp)
    assert plan.estimate.fits and plan.estimate.kv_tokens >= plan.estimate.kv_tokens_needed
    assert plan.profile_id == f"{parse_gpu(gpu).architecture}-{dtype}-tp{tp}"


def test_auto_dtype_is_fp8_on_sm89_and_newer_else_bf16() -> None:
    assert plan_build(LLAMA31, parse_gpu("H100-80GB"), 8).precision == "fp8"
    assert plan_build(LLAMA31, parse_gpu("L40S"), 8).precision == "fp8"
    assert plan_build(LLAMA31, parse_gpu("A100-80GB"), 8).precision == "bf16"


def test_fp8_on_ampere_is_refused() -> None:
    with pytest.raises(PlanError, match=r"fp8 needs sm89 or newer.*sm80"):
        plan_build(LLAMA31, parse_gpu("A100-80GB"), 8, dtype="fp8")


def test_too_few_gpus_is_refused_naming_what_is_needed() -> None:
    with pytest.raises(PlanError) as e:
        plan_build(LLAMA31, parse_gpu("H100-80GB"), 2, dtype="fp16")
    message = str(e.value)
    assert "does not fit on 2 x H100-80GB" in message
    assert "needs 4 x H100-80GB (--gpus 4)" in message
    assert "tp 2:" in message and "needs 131,072" in message


def test_nothing_fits_says_so() -> None:
    with pytest.raises(PlanError, match="no tensor-parallel size fits"):
        plan_build(LLAMA31, parse_gpu("A10G"), 8, dtype="bf16")


def test_explicit_tp_is_checked() -> None:
    assert plan_build(LLAMA31, parse_gpu("H200"), 8, dtype="fp8", tp=4).tp == 4
    with pytest.raises(PlanError, match="--tp 3: must be a power of two"):
        plan_build(LLAMA31, parse_gpu("H200"), 8, tp=3)
    with pytest.raises(PlanError, match="needs 2 x H200"):
        plan_build(LLAMA31, parse_gpu("H200"), 1, dtype="fp16", tp=2)


def test_limits_are_validated_by_name() -> None:
    with pytest.raises(PlanError, match=r"--max-seq-len must be in 1\.\.4096"):
        plan_build(TARGET_MODELS["llama-2-70b-chat"], parse_gpu("H200"), 8, max_seq_len=8192)
    with pytest.raises(PlanError, match="--gpus must be at least 1"):
        plan_build(LLAMA31, parse_gpu("H200"), 0)


def test_shorter_max_seq_len_needs_less() -> None:
    long = plan_build(LLAMA31, parse_gpu("H100-80GB"), 8, dtype="fp16")
    short = plan_build(LLAMA31, parse_gpu("H100-80GB"), 8, dtype="fp16", max_seq_len=4096, max_batch_size=8)
    assert short.estimate.kv_tokens_needed < long.estimate.kv_tokens_needed
    assert short.tp <= long.tp


def test_arch_from_a_checkpoints_config_json(tmp_path: Path) -> None:
    config = {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
              "intermediate_size": 28672, "vocab_size": 128256, "max_position_embeddings": 131072}
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = load_arch(str(tmp_path))
    assert arch.parameters == LLAMA31.parameters
    assert arch.context_length == 131072


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="'hidden_size' must be a positive integer"):
        arch_from_config({"num_attention_heads": 8}, "x")
    with pytest.raises(PlanError, match="not a multiple of num_key_value_heads"):
        arch_from_config({"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 8,
                          "num_key_value_heads": 3, "intermediate_size": 1, "vocab_size": 1,
                          "max_position_embeddings": 1}, "x")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_arch(str(tmp_path))
    with pytest.raises(PlanError, match="neither a checkpoint folder"):
        load_arch("llama-5-9000b")


def test_plan_json_is_serialisable() -> None:
    data = json.loads(json.dumps(plan_build(LLAMA31, parse_gpu("H200"), 1).to_json()))
    assert data["tensor_parallel_size"] == 1 and data["precision"] == "fp8"
    assert data["per_gpu"]["memory_needed"] <= parse_gpu("H200").memory_bytes


def test_gpu_descriptions_and_nvidia_smi_parsing() -> None:
    assert parse_gpu("h100").name == "H100-80GB"
    assert parse_gpu("H200").architecture == "sm90"
    assert parse_gpu("B200").architecture == "sm100"
    assert parse_gpu("L40S").architecture == "sm89"
    with pytest.raises(GpuError, match="--gpu: unknown GPU 'V100'; known: A100-40GB"):
        parse_gpu("V100")
    gpus = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 9.0, 81559 MiB\nNVIDIA H100 80GB HBM3, 9.0, 81559 MiB\n")
    assert len(gpus) == 2 and gpus[0].architecture == "sm90" and round(gpus[0].memory_bytes / GIB, 1) == 79.6
    with pytest.raises(GpuError, match="unexpected nvidia-smi line"):
        parse_nvidia_smi("garbage")


def test_only_gpus_cuda_can_see_count() -> None:
    four = [parse_gpu("H100"), parse_gpu("H100"), parse_gpu("A100-80GB"), parse_gpu("A100-80GB")]
    assert visible(four, None) == four
    assert [g.name for g in visible(four, "2,0")] == ["A100-80GB", "H100-80GB"]
    assert visible(four, "") == []
    assert visible(four, "GPU-8c2a3f1e") == four, "UUIDs are the driver's to resolve"


def _build_engine(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "build_engine.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_build_engine_plan_cli() -> None:
    done = _build_engine("--plan", "--model", "llama-3.1-70b-instruct", "--gpu", "H100-80GB", "--gpus", "2")
    assert done.returncode == 0, done.stderr
    assert "precision          fp8" in done.stdout and "tensor parallel    2" in done.stdout
    assert "profile            sm90-fp8-tp2" in done.stdout
    refused = _build_engine("--plan", "--model", "llama-2-70b-chat", "--gpu", "H100-80GB", "--gpus", "2",
                            "--dtype", "fp16")
    assert refused.returncode == 2
    assert "needs 4 x H100-80GB (--gpus 4)" in refused.stderr


@pytest.mark.parametrize(("given", "target"), [
    ("meta-llama/Llama-3.1-70B-Instruct", "llama-3.1-70b-instruct"),
    ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama-3.1-70b-instruct"),
    ("Llama-3.1-70B-Instruct", "llama-3.1-70b-instruct"),
    ("meta-llama/Llama-2-70b-chat-hf", "llama-2-70b-chat"),
    ("codellama/CodeLlama-70b-Instruct-hf", "codellama-70b-instruct"),
    ("nvidia/Llama-3.1-Nemotron-70B-Instruct-HF", "llama-3.1-nemotron-70b-instruct"),
    ("LLAMA-3.1-70B-INSTRUCT", "llama-3.1-70b-instruct"),
])
def test_hugging_face_ids_name_the_target_models(given: str, target: str) -> None:
    assert load_arch(given) == TARGET_MODELS[target]


def test_build_engine_plan_takes_a_hugging_face_id() -> None:
    done = _build_engine("--plan", "--model", "meta-llama/Llama-3.1-70B-Instruct", "--gpu", "H100-80GB", "--gpus", "2")
    assert done.returncode == 0, done.stderr
    assert "profile            sm90-fp8-tp2" in done.stdout
    unknown = _build_engine("--plan", "--model", "meta-llama/Llama-9-70B", "--gpu", "H100-80GB")
    assert unknown.returncode == 2 and "meta-llama/Llama-3.1-70B-Instruct" in unknown.stderr


@pytest.mark.skipif(bool(detect_gpus()), reason="a GPU is present: the gpu-marked tests build for real")
def test_engine_build_without_a_gpu_fails_clearly(tmp_path: Path) -> None:
    """The build stops at GPU detection, before importing TensorRT-LLM, and says how to plan instead."""
    checkpoint = str(ROOT / "engines" / "demo" / "checkpoint")
    done = _build_engine("--model", checkpoint, "--name", "x", "--backend", "tensorrt-llm",
                         "--engines-dir", str(tmp_path))
    assert done.returncode == 2
    assert "no NVIDIA GPU detected: pass --gpu NAME --gpus N to plan" in done.stderr
    described = _build_engine("--model", checkpoint, "--name", "x", "--backend", "tensorrt-llm", "--gpu", "H100",
                              "--engines-dir", str(tmp_path))
    assert described.returncode == 2
    assert "a TensorRT engine is built on the GPU it targets, and this machine has no NVIDIA GPU" in described.stderr
    assert not (tmp_path / "x").exists()


# -- building: everything around the TensorRT-LLM call ---------------------------------------------------------


def build_args(tmp_path: Path, **overrides: object) -> argparse.Namespace:
    values: dict[str, object] = dict(model=str(ROOT / "engines" / "demo" / "checkpoint"), name="tiny",
                                     engines_dir=tmp_path, backend="tensorrt-llm", plan=False, gpu=None, gpus=None,
                                     dtype="bf16", tp=None, max_batch_size=8, max_seq_len=1024, max_num_tokens=2048)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_target_gpus_from_detection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    h100 = parse_gpu("H100-80GB")
    monkeypatch.setattr(build_trtllm, "detect_gpus", lambda: [h100, h100])
    assert build_trtllm.target_gpus(build_args(tmp_path)) == (h100, 2)
    assert build_trtllm.target_gpus(build_args(tmp_path, gpus=4, plan=True)) == (h100, 4)
    with pytest.raises(GpuError, match="--gpus 4: only 2 GPUs are present"):
        build_trtllm.target_gpus(build_args(tmp_path, gpus=4))
    with pytest.raises(GpuError, match="a TensorRT engine is built on the GPU it targets, and this machine has sm90"):
        build_trtllm.target_gpus(build_args(tmp_path, gpu="A100-80GB"))
    monkeypatch.setattr(build_trtllm, "detect_gpus", lambda: [h100, parse_gpu("A100-80GB")])
    with pytest.raises(GpuError, match="different architectures"):
        build_trtllm.target_gpus(build_args(tmp_path))


def test_engine_build_writes_the_profile_and_manifest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The TensorRT-LLM call itself is replaced by one writing an engine file; the rest is the real build."""
    def fake_trtllm_build(plan: object, checkpoint: Path, out_dir: Path) -> dict[str, str]:
        (out_dir / "rank0.engine").write_bytes(b"engine bytes")
        (out_dir / "config.json").write_text("{}")
        return {"tensorrt_llm_version": "1.2.0", "tensorrt_version": "10.13.2"}

    monkeypatch.setattr(build_trtllm, "detect_gpus", lambda: [parse_gpu("H100-80GB")])
    monkeypatch.setattr(build_trtllm, "build_engine", fake_trtllm_build)
    assert build_trtllm.run(build_args(tmp_path)) == 0
    folder = tmp_path / "tiny" / "profiles" / "tensorrt-sm90-bf16-tp1"
    profile = load_profile(folder)
    assert (profile.runtime, profile.gpu_architecture, profile.precision, profile.tensor_parallel_size) == (
        "tensorrt", "sm90", "bf16", 1)
    assert (profile.max_batch_size, profile.max_seq_len, profile.max_num_tokens) == (8, 1024, 2048)
    assert profile.tensorrt_llm_version == "1.2.0" and profile.data["tensorrt_version"] == "10.13.2"
    assert profile.data["build_args"]["dtype"] == "bf16"
    checksum = profile.data["checksum"]
    assert checksum["files"]["rank0.engine"] == hashlib.sha256(b"engine bytes").hexdigest()
    assert set(checksum["files"]) == {"rank0.engine", "config.json"}
    manifest = load_manifest(tmp_path / "tiny")
    assert (manifest.backend, manifest.context_length) == ("tensorrt-llm", 1024)
    assert (manifest.checkpoint / "tokenizer.json").is_file()
    assert not (manifest.checkpoint / "model.safetensors").exists(), "engines need the tokenizer, not the weights"

    assert build_trtllm.run(build_args(tmp_path, dtype="fp8", max_seq_len=512)) == 0
    assert load_manifest(tmp_path / "tiny").context_length == 512, "a second profile keeps the shorter context"
    assert {p.name for p in (tmp_path / "tiny" / "profiles").iterdir()} == {
        "tensorrt-sm90-bf16-tp1", "tensorrt-sm90-fp8-tp1"}


def test_pytorch_profiles_take_the_checkpoints_precision(tmp_path: Path) -> None:
    demo = ROOT / "engines" / "demo" / "checkpoint"          # float32 weights, no quantization
    assert checkpoint_precision(demo) == "bf16"
    assert pytorch_dtype(demo, "auto") == "bf16" and pytorch_dtype(demo, "fp16") == "fp16"
    with pytest.raises(PlanError, match="serves fp8 only from an FP8 checkpoint"):
        pytorch_dtype(demo, "fp8")
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    (tmp_path / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    assert pytorch_dtype(tmp_path, "auto") == "fp8"
    with pytest.raises(PlanError, match="holds fp8 weights"):
        pytorch_dtype(tmp_path, "bf16")
    (tmp_path / "hf_quant_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16",
                                                      "quantization_config": {"quant_method": "fp8"}}))
    assert checkpoint_precision(tmp_path) == "fp8"


def test_pytorch_build_of_a_16_bit_checkpoint_refuses_fp8(tmp_path: Path) -> None:
    done = _build_engine("--model", str(ROOT / "engines" / "demo" / "checkpoint"), "--name", "x", "--backend",
                         "pytorch", "--gpu", "H100", "--dtype", "fp8", "--engines-dir", str(tmp_path))
    assert done.returncode == 2
    assert "--dtype fp8:" in done.stderr and "holds bf16 weights" in done.stderr


def test_profiles_verify_finds_damaged_artifacts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_trtllm_build(plan: object, checkpoint: Path, out_dir: Path) -> dict[str, str]:
        (out_dir / "rank0.engine").write_bytes(b"engine bytes")
        return {"tensorrt_llm_version": "1.2.0", "tensorrt_version": "10.13.2"}

    monkeypatch.setattr(build_trtllm, "detect_gpus", lambda: [parse_gpu("H100-80GB")])
    monkeypatch.setattr(build_trtllm, "build_engine", fake_trtllm_build)
    assert build_trtllm.run(build_args(tmp_path)) == 0
    verify = [sys.executable, "-m", "service", "profiles", "--engines-dir", str(tmp_path), "--gpu", "H100",
              "--trtllm-version", "1.2.0", "--verify"]
    whole = subprocess.run(verify, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert whole.returncode == 0 and "artifacts match their checksums" in whole.stdout
    (tmp_path / "tiny" / "profiles" / "tensorrt-sm90-bf16-tp1" / "rank0.engine").write_bytes(b"truncated")
    damaged = subprocess.run(verify, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert damaged.returncode == 1
    assert "DAMAGED: changed: rank0.engine" in damaged.stdout
