"""`build_engine.py --plan | --backend tensorrt-llm | --backend pytorch`: plans, engine builds and profiles.

Engines are built with TensorRT-LLM 1.2's LLM API in its TensorRT flow
(`tensorrt_llm._tensorrt_engine.LLM` with a `BuildConfig`, `llm.save(dir)`),
the last release line that has it: it is gone after 1.3.0rc20. `--backend pytorch`
builds nothing: TensorRT-LLM 1.3 and later load the Hugging Face checkpoint
directly, so the profile only records the plan and links the checkpoint.
TensorRT-LLM is imported inside the build alone, so planning works anywhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from service.repository.build.plan import BuildPlan, ModelArch, PlanError, load_arch, plan_build, pytorch_dtype
from service.repository.gpus import Gpu, GpuError, detect_gpus, parse_gpu
from service.repository.manifest import MANIFEST, ManifestError, ModelManifest, load_manifest, write_manifest
from service.repository.profiles import PROFILE_FILE, PYTORCH_MIN_VERSION, artifact_checksum

TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp8": "auto"}
PYTORCH_MODEL_LINK = "model"


class BuildError(RuntimeError):
    pass


def run(args: argparse.Namespace) -> int:
    try:
        if not args.model:
            raise PlanError("--model is required: a checkpoint folder, or with --plan a target model id")
        arch = load_arch(args.model)
        gpu, count = target_gpus(args)
        dtype = args.dtype
        if args.backend == "pytorch" and Path(args.model).is_dir():
            dtype = pytorch_dtype(Path(args.model), dtype)
        plan = plan_build(arch, gpu, count, dtype=dtype, tp=args.tp, max_batch_size=args.max_batch_size,
                          max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens)
    except (PlanError, GpuError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.describe())
    if args.plan:
        return 0
    try:
        build(args, arch, plan)
    except (BuildError, ManifestError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def target_gpus(args: argparse.Namespace) -> tuple[Gpu, int]:
    """The described GPU (--gpu, --gpus) or the detected ones; an engine build needs them present."""
    detected = detect_gpus()
    if args.gpus is not None and args.gpus < 1:
        raise GpuError(f"--gpus must be at least 1, got {args.gpus}")
    if args.gpu:
        gpu = parse_gpu(args.gpu)
        if args.backend == "tensorrt-llm" and not args.plan and not any(
                g.architecture == gpu.architecture for g in detected):
            raise GpuError(f"--gpu {args.gpu}: a TensorRT engine is built on the GPU it targets, and this machine "
                           f"has {', '.join(sorted({g.architecture for g in detected})) or 'no NVIDIA GPU'}")
        return gpu, args.gpus or 1
    if not detected:
        raise GpuError("no NVIDIA GPU detected: pass --gpu NAME --gpus N to plan for one (e.g. --gpu H100-80GB)")
    if len({g.architecture for g in detected}) > 1:
        raise GpuError(f"GPUs of different architectures ({', '.join(g.describe() for g in detected)}); "
                       "pass --gpu to choose which to build for")
    count = args.gpus or len(detected)
    if count > len(detected) and not args.plan:
        raise GpuError(f"--gpus {count}: only {len(detected)} GPUs are present")
    return min(detected, key=lambda g: g.memory_bytes), count


def build(args: argparse.Namespace, arch: ModelArch, plan: BuildPlan) -> None:
    if not args.name:
        raise BuildError("--name is required to build (the folder under --engines-dir)")
    checkpoint = Path(args.model)
    if not (checkpoint / "config.json").is_file():
        raise BuildError(f"--model: building needs a local Hugging Face checkpoint folder, got {args.model!r}")
    model_dir = args.engines_dir / args.name
    runtime = "pytorch" if args.backend == "pytorch" else "tensorrt"
    arch = plan.gpu.architecture if runtime == "tensorrt" else pytorch_min_architecture(plan.precision)
    profile_dir = model_dir / "profiles" / f"{runtime}-{arch}-{plan.precision}-tp{plan.tp}"
    if profile_dir.exists():
        shutil.rmtree(profile_dir)
    profile_dir.mkdir(parents=True)
    started = time.monotonic()
    if runtime == "pytorch":
        (profile_dir / PYTORCH_MODEL_LINK).symlink_to(checkpoint.resolve(), target_is_directory=True)
        versions = {"tensorrt_llm_version": ".".join(map(str, PYTORCH_MIN_VERSION)), "tensorrt_version": None}
    else:
        versions = build_engine(plan, checkpoint, profile_dir)
    record = profile_record(args, plan, runtime, arch, versions, profile_dir)
    (profile_dir / PROFILE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    write_model_manifest(model_dir, args.name, checkpoint, plan.max_seq_len)
    print(f"wrote {profile_dir} in {time.monotonic() - started:.0f} s; serve with: "
          f"llmserve serve --engines-dir {args.engines_dir}")


def _step(number: int, total: int, text: str, started: float) -> None:
    print(f"[{number}/{total}] {text} (+{time.monotonic() - started:.0f} s)", flush=True)


def build_engine(plan: BuildPlan, checkpoint: Path, out_dir: Path) -> dict[str, Any]:
    """Builds and saves the TensorRT engine of the plan with TensorRT-LLM 1.2. Names as in the 1.x sources and
    API reference (tensorrt_llm/_tensorrt_engine/__init__.py: LLM = llmapi.llm._TrtLLM, which has save();
    tensorrt_llm.llmapi exports BuildConfig, QuantConfig, QuantAlgo); the v1.2.0 tag itself was not readable
    where this was written, see docs/tensorrt-llm.md."""
    started = time.monotonic()
    _step(1, 4, "importing TensorRT-LLM", started)
    try:
        import tensorrt
        import tensorrt_llm
        from tensorrt_llm._tensorrt_engine import LLM
        from tensorrt_llm.llmapi import BuildConfig, QuantAlgo, QuantConfig
    except ImportError as e:
        raise BuildError(f"engine builds need TensorRT-LLM 1.2 with its TensorRT flow ({e}); use the Dockerfile's "
                         "trtllm target, or --backend pytorch for TensorRT-LLM 1.3 and later") from None
    # max_input_len defaults to 1024 in the LLM API: a prompt may use the whole sequence.
    build_config = BuildConfig(max_batch_size=plan.max_batch_size, max_seq_len=plan.max_seq_len,
                               max_input_len=plan.max_seq_len, max_num_tokens=plan.max_num_tokens)
    quant = (QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8) if plan.precision == "fp8"
             else QuantConfig())
    _step(2, 4, f"building {plan.profile_id} from {checkpoint} (quantizing and compiling take tens of minutes "
          "for a 70B)", started)
    # The TensorRT flow computes logprobs from generation logits (executor/result.py, compute_logprobs), which an
    # engine returns only when built to gather them (BaseLlmArgs.gather_generation_logits).
    llm = LLM(model=str(checkpoint), tensor_parallel_size=plan.tp, dtype=TORCH_DTYPES[plan.precision],
              build_config=build_config, quant_config=quant, gather_generation_logits=True)
    try:
        _step(3, 4, f"saving the engine to {out_dir}", started)
        llm.save(str(out_dir))
    finally:
        llm.shutdown()
    _step(4, 4, "checksumming", started)
    return {"tensorrt_llm_version": tensorrt_llm.__version__, "tensorrt_version": tensorrt.__version__}


def pytorch_min_architecture(precision: str) -> str:
    """A PyTorch-backend profile is not compiled for one GPU: it runs on any GPU its precision runs on."""
    return "sm89" if precision == "fp8" else "sm80"


def profile_record(args: argparse.Namespace, plan: BuildPlan, runtime: str, arch: str, versions: dict[str, Any],
                   profile_dir: Path) -> dict[str, Any]:
    return {
        "id": profile_dir.name,
        "runtime": runtime,
        "gpu_architecture": arch,
        "gpu_name": plan.gpu.name,
        "precision": plan.precision,
        "tensor_parallel_size": plan.tp,
        "min_gpu_memory_bytes": plan.estimate.memory_needed_per_gpu,
        "max_batch_size": plan.max_batch_size,
        "max_seq_len": plan.max_seq_len,
        "max_num_tokens": plan.max_num_tokens,
        **versions,
        "build_args": {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())},
        "plan": plan.to_json(),
        "checksum": artifact_checksum(profile_dir),
        "created": int(time.time()),
    }


def write_model_manifest(model_dir: Path, name: str, checkpoint: Path, max_seq_len: int) -> None:
    """The model's manifest and a copy of its tokenizer; a second profile keeps the shorter context."""
    tokenizer_dir = model_dir / "checkpoint"
    tokenizer_dir.mkdir(exist_ok=True)
    for file in TOKENIZER_FILES:
        if (checkpoint / file).is_file():
            shutil.copy2(checkpoint / file, tokenizer_dir / file)
    context = max_seq_len
    if (model_dir / MANIFEST).is_file():
        context = min(context, load_manifest(model_dir).context_length)
    write_manifest(ModelManifest(root=model_dir, name=name, backend="tensorrt-llm", context_length=context,
                                 checkpoint=tokenizer_dir, created=int(time.time()),
                                 profiles=model_dir / "profiles"))
