"""Engine profiles and choosing one for the local GPUs, as NVIDIA NIM does.

A model built for TensorRT-LLM has one profile per build target under
`engines/<name>/profiles/<id>/profile.json`. A TensorRT plan refuses to load on
another compute capability or another TensorRT-LLM release, so a profile fits
only where the architecture and the TensorRT-LLM major.minor match, there are
at least tp GPUs of it, and each has the memory the plan needed. PyTorch-runtime
profiles carry no plan: they need TensorRT-LLM 1.3 or later and a GPU at least
as new as their precision needs. Among those that fit, fp8 comes first, then
the smallest tp (fewer GPUs, no all-reduce), so a bigger box still picks the
cheapest profile that serves.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.repository.gpus import GIB, Gpu, GpuError, detect_gpus, parse_gpu
from service.repository.json_file import read_object, typed

PROFILE_FILE = "profile.json"
RUNTIMES = ("tensorrt", "pytorch")
PRECISION_ORDER = ("fp8", "bf16", "fp16")
PYTORCH_MIN_VERSION = (1, 3)


class ProfileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Profile:
    id: str
    path: Path
    runtime: str
    gpu_architecture: str          # tensorrt: the build target; pytorch: the oldest architecture it runs on
    gpu_name: str
    precision: str
    tensor_parallel_size: int
    min_gpu_memory_bytes: int
    tensorrt_llm_version: str      # tensorrt: the release it was built with; pytorch: the oldest that loads it
    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    data: dict[str, Any]

    @property
    def capability(self) -> tuple[int, int]:
        return _capability(self.gpu_architecture)


def _capability(arch: str) -> tuple[int, int]:
    match = re.fullmatch(r"sm(\d+)(\d)", arch)
    if not match:
        raise ProfileError(f"gpu_architecture must look like sm90, got {arch!r}")
    return int(match.group(1)), int(match.group(2))


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: '1.2.0rc3' -> (1, 2, 0)."""
    numbers = re.match(r"\d+(?:\.\d+)*", version.strip())
    if not numbers:
        raise ProfileError(f"not a version: {version!r}")
    return tuple(int(n) for n in numbers.group(0).split("."))


def _field(data: dict[str, Any], key: str, kind: type, where: Path) -> Any:
    return typed(data, key, kind, where, ProfileError)


def load_profile(folder: Path) -> Profile:
    path = folder / PROFILE_FILE
    data = read_object(path, ProfileError, f"{folder}: no {PROFILE_FILE}")
    runtime = _field(data, "runtime", str, path)
    if runtime not in RUNTIMES:
        raise ProfileError(f"{path}: 'runtime' must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    precision = _field(data, "precision", str, path)
    if precision not in PRECISION_ORDER:
        raise ProfileError(f"{path}: 'precision' must be one of {', '.join(PRECISION_ORDER)}, got {precision!r}")
    arch = _field(data, "gpu_architecture", str, path)
    try:
        _capability(arch)
        version_tuple(_field(data, "tensorrt_llm_version", str, path))
    except ProfileError as e:
        raise ProfileError(f"{path}: {e}") from None
    tp = _field(data, "tensor_parallel_size", int, path)
    if tp < 1:
        raise ProfileError(f"{path}: 'tensor_parallel_size' must be at least 1, got {tp}")
    return Profile(
        id=str(data.get("id") or folder.name),
        path=folder,
        runtime=runtime,
        gpu_architecture=arch,
        gpu_name=str(data.get("gpu_name", "")),
        precision=precision,
        tensor_parallel_size=tp,
        min_gpu_memory_bytes=_field(data, "min_gpu_memory_bytes", int, path),
        tensorrt_llm_version=data["tensorrt_llm_version"],
        max_batch_size=_field(data, "max_batch_size", int, path),
        max_seq_len=_field(data, "max_seq_len", int, path),
        max_num_tokens=_field(data, "max_num_tokens", int, path),
        data=data,
    )


def load_profiles(profiles_dir: Path) -> list[Profile]:
    if not profiles_dir.is_dir():
        raise ProfileError(f"{profiles_dir}: no profiles folder "
                           "(build one with build_engine.py --backend tensorrt-llm)")
    profiles = [load_profile(d) for d in sorted(profiles_dir.iterdir()) if (d / PROFILE_FILE).is_file()]
    if not profiles:
        raise ProfileError(f"{profiles_dir}: no profiles (build one with build_engine.py --backend tensorrt-llm)")
    return profiles


def artifact_checksum(folder: Path) -> dict[str, Any]:
    """sha256 of every artifact (profile.json aside; links, such as a pytorch profile's checkpoint, are not
    followed) and one digest over them all, to tell that a copied profile is whole."""
    files: dict[str, str] = {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_symlink() or path == folder / PROFILE_FILE:
                continue
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            files[str(path.relative_to(folder))] = digest.hexdigest()
    overall = hashlib.sha256("".join(f"{name} {sha}\n" for name, sha in sorted(files.items())).encode())
    return {"algorithm": "sha256", "files": files, "digest": overall.hexdigest()}


def damaged(profile: Profile) -> str | None:
    """What differs from the checksum recorded at build time, or None when the artifacts are as built."""
    recorded = profile.data.get("checksum")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict):
        return "no checksum recorded"
    actual = artifact_checksum(profile.path)["files"]
    missing = sorted(set(recorded["files"]) - set(actual))
    changed = sorted(f for f in actual if f in recorded["files"] and actual[f] != recorded["files"][f])
    extra = sorted(set(actual) - set(recorded["files"]))
    problems = [f"{label}: {', '.join(names)}" for label, names in
                (("missing", missing), ("changed", changed), ("unexpected", extra)) if names]
    return "; ".join(problems) or None


def installed_trtllm_version() -> str | None:
    try:
        return importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return None


def mismatch(profile: Profile, gpus: list[Gpu], trtllm_version: str | None) -> str | None:
    """Why the profile cannot run here, or None when it can."""
    if trtllm_version is None:
        return "TensorRT-LLM is not installed"
    installed = version_tuple(trtllm_version)
    wanted = version_tuple(profile.tensorrt_llm_version)
    if profile.runtime == "tensorrt":
        if installed[:2] != wanted[:2]:
            return (f"built with TensorRT-LLM {profile.tensorrt_llm_version}, installed {trtllm_version} "
                    f"(engines load only on the same major.minor)")
        usable = [g for g in gpus if g.architecture == profile.gpu_architecture]
        arch_need = profile.gpu_architecture
    else:
        floor = max(wanted[:2], PYTORCH_MIN_VERSION)
        if installed[:2] < floor:
            return f"needs TensorRT-LLM {'.'.join(map(str, floor))} or later, installed {trtllm_version}"
        usable = [g for g in gpus if g.compute_capability >= profile.capability]
        arch_need = f"{profile.gpu_architecture} or newer"
    if not usable:
        return f"needs {arch_need}; found {_architectures(gpus)}"
    tp = profile.tensor_parallel_size
    if len(usable) < tp:
        return f"needs {tp} GPUs of {arch_need}, found {len(usable)}"
    smallest = min(usable[:tp], key=lambda g: g.memory_bytes)
    if smallest.memory_bytes < profile.min_gpu_memory_bytes:
        return (f"needs {profile.min_gpu_memory_bytes / GIB:.1f} GiB per GPU, {smallest.name} has "
                f"{smallest.memory_gib:.1f} GiB")
    return None


def _architectures(gpus: list[Gpu]) -> str:
    return ", ".join(sorted({g.architecture for g in gpus})) or "no GPU"


def preference(profile: Profile) -> tuple[int, int, int, str]:
    return (PRECISION_ORDER.index(profile.precision), profile.tensor_parallel_size,
            RUNTIMES.index(profile.runtime), profile.id)


def describe_machine(gpus: list[Gpu], trtllm_version: str | None) -> str:
    found = ", ".join(g.describe() for g in gpus) if gpus else "no NVIDIA GPU"
    return f"{found}; TensorRT-LLM {trtllm_version or 'not installed'}"


def select_profile(model: str, profiles: list[Profile], gpus: list[Gpu], trtllm_version: str | None) -> Profile:
    """The preferred profile that fits, or a ProfileError naming what was found and what each profile needs."""
    fitting = [p for p in profiles if mismatch(p, gpus, trtllm_version) is None]
    if fitting:
        return min(fitting, key=preference)
    lines = [f"no profile of model {model!r} fits this machine: found {describe_machine(gpus, trtllm_version)}"]
    lines += [f"  {p.id}: {mismatch(p, gpus, trtllm_version)}" for p in sorted(profiles, key=preference)]
    raise ProfileError("\n".join(lines))


def profile_by_id(model: str, profiles: list[Profile], profile_id: str) -> Profile:
    for p in profiles:
        if p.id == profile_id:
            return p
    raise ProfileError(f"--trt-profile: model {model!r} has no profile {profile_id!r}; "
                       f"profiles: {', '.join(p.id for p in profiles)}")


# -- `llmserve profiles` ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engines-dir", type=Path, default=Path("engines"))
    parser.add_argument("--gpu", help="describe the GPUs instead of detecting them, e.g. H100-80GB")
    parser.add_argument("--gpus", type=int, default=1, help="how many of --gpu")
    parser.add_argument("--trtllm-version", help="TensorRT-LLM version to match (default: the installed one)")
    parser.add_argument("--verify", action="store_true", help="check every profile's artifacts against the "
                        "checksums recorded at build time (reads every engine file)")


def main(args: argparse.Namespace) -> int:
    from service.repository.manifest import ManifestError, discover

    try:
        gpus = [parse_gpu(args.gpu)] * args.gpus if args.gpu else detect_gpus()
        manifests = discover(args.engines_dir)
    except (GpuError, ManifestError) as e:
        print(f"error: {e}")
        return 2
    if args.gpu and args.gpus < 1:
        print("error: --gpus must be at least 1")
        return 2
    version = args.trtllm_version or installed_trtllm_version()
    print(f"machine: {describe_machine(gpus, version)}")
    failed = False
    for manifest in manifests:
        if manifest.backend != "tensorrt-llm":
            print(f"\n{manifest.name}: {manifest.backend} engine (no profiles)")
            continue
        print(f"\n{manifest.name}:")
        try:
            profiles = load_profiles(manifest.profiles or manifest.root / "profiles")
        except ProfileError as e:
            print(f"  error: {e}")
            continue
        fitting = [p for p in profiles if mismatch(p, gpus, version) is None]
        chosen = min(fitting, key=preference) if fitting else None
        for p in sorted(profiles, key=preference):
            why = mismatch(p, gpus, version)
            mark = "* chosen" if p is chosen else ("  fits" if why is None else f"  no: {why}")
            print(f"  {p.id:<28} {p.runtime:<9} {p.precision:<5} tp{p.tensor_parallel_size:<3} {mark}")
            if args.verify:
                problem = damaged(p)
                status = f"DAMAGED: {problem}" if problem else "artifacts match their checksums"
                print(f"  {'':<28} {status}")
                failed = failed or problem is not None
        if chosen is None:
            print("  none fits this machine")
    return 1 if failed else 0
