"""`llmserve trtllm-worker`: TensorRT-LLM's own gRPC server on the profile of a model that fits this machine.

A TensorRT-LLM worker pod runs this. It chooses the model's profile for the
local GPUs and TensorRT-LLM release as profiles.py does (or the one
--trt-profile names), then replaces itself with TensorRT-LLM's server in
gRPC mode: `python -m tensorrt_llm.commands.serve MODEL --grpc`, where MODEL is
the profile's engine folder (the TensorRT flow, 1.2) or its checkpoint (the
PyTorch backend, 1.3 and later), with the --trt-* settings as its arguments.
llmserve then reaches it as `--worker NAME=trtllm://HOST:PORT`. The LLM API
arguments trtllm-serve has no flag for go in an --extra_llm_api_options file
(JSON, which YAML reads). `--print` shows the command instead of running it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.config import TrtllmConfig, add_section, section_from_args
from service.repository.gpus import GpuError, detect_gpus, parse_gpu
from service.repository.manifest import ManifestError, ModelManifest, discover
from service.repository.profiles import (
    Profile,
    ProfileError,
    installed_trtllm_version,
    load_profiles,
    profile_by_id,
    select_profile,
)

PYTORCH_MODEL_LINK = "model"   # a pytorch profile's link to its checkpoint (service/repository/build/trtllm.py)
_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def llm_options(profile: Profile, config: TrtllmConfig) -> dict[str, Any]:
    """LLM API arguments (BaseLlmArgs fields) that trtllm-serve takes only from its options file."""
    options: dict[str, Any] = {
        "kv_cache_config": {"free_gpu_memory_fraction": config.trt_kv_cache_fraction,
                            "enable_block_reuse": config.trt_block_reuse},
        "max_input_len": profile.max_seq_len,   # the LLM API's default is 1024; llmserve checks the context
        "guided_decoding_backend": "xgrammar",  # response_format and forced tool calls
    }
    if profile.runtime == "tensorrt":
        options["gather_generation_logits"] = True   # logprobs, as the engine was built
    else:
        options["dtype"] = _DTYPES.get(profile.precision, "auto")
    return options


def worker_command(manifest: ModelManifest, profile: Profile, config: TrtllmConfig, host: str, port: int,
                   options_file: Path) -> list[str]:
    model = profile.path if profile.runtime == "tensorrt" else profile.path / PYTORCH_MODEL_LINK
    command = [
        sys.executable, "-m", "tensorrt_llm.commands.serve", str(model), "--grpc", "--host", host, "--port", str(port),
        "--backend", profile.runtime, "--tokenizer", str(manifest.checkpoint),
        "--tp_size", str(profile.tensor_parallel_size),
        "--max_batch_size", str(min(config.trt_max_batch_size, profile.max_batch_size)),
        "--max_num_tokens", str(min(config.trt_max_num_tokens, profile.max_num_tokens)),
        "--max_seq_len", str(profile.max_seq_len),
        "--extra_llm_api_options", str(options_file),
    ]
    if config.trt_chunked_prefill:
        command.append("--enable_chunked_prefill")
    return command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the model's name in the engines directory")
    parser.add_argument("--engines-dir", type=Path, default=Path(os.environ.get("LLMSERVE_ENGINES_DIR", "engines")))
    parser.add_argument("--host", default="127.0.0.1", help="address the worker listens on (0.0.0.0 in a pod)")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--gpu", help="describe the GPUs instead of detecting them, e.g. H100-80GB (with --print)")
    parser.add_argument("--gpus", type=int, default=1, help="how many of --gpu")
    parser.add_argument("--trtllm-version", help="TensorRT-LLM version to match (default: the installed one)")
    parser.add_argument("--print", action="store_true", help="print the command and its options instead of running")
    add_section(parser, TrtllmConfig)


def main(args: argparse.Namespace) -> int:
    config = section_from_args(TrtllmConfig, args)
    try:
        manifest = next((m for m in discover(args.engines_dir) if m.name == args.model), None)
        if manifest is None:
            raise ManifestError(f"no model {args.model!r} in {args.engines_dir}")
        profiles = load_profiles(manifest.profiles or manifest.root / "profiles")
        if config.trt_profile:
            profile = profile_by_id(manifest.name, profiles, config.trt_profile)
        else:
            gpus = [parse_gpu(args.gpu)] * args.gpus if args.gpu else detect_gpus()
            profile = select_profile(manifest.name, profiles, gpus, args.trtllm_version or installed_trtllm_version())
    except (ManifestError, ProfileError, GpuError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = llm_options(profile, config)
    with tempfile.NamedTemporaryFile("w", prefix=f"trtllm-{manifest.name}-", suffix=".yaml", delete=False) as f:
        json.dump(options, f, indent=2)
    command = worker_command(manifest, profile, config, args.host, args.port, Path(f.name))
    if args.print:
        Path(f.name).unlink()
        print(" ".join(command))
        print(json.dumps(options, indent=2))
        return 0
    print(f"{manifest.name}: profile {profile.id}", file=sys.stderr, flush=True)
    os.execv(command[0], command)
