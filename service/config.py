"""All configuration, in one place.

Every setting is a dataclass field declared once with its default and help;
the CLI flag (`--grpc-port`) and its environment variable (`LLMSERVE_GRPC_PORT`)
are derived from the field's name, and the environment supplies the default
the flag overrides. Lists read comma-separated from the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "LLMSERVE_"


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A setting: its default and help text, plus extra argparse options (choices...); `flag` names the flag
    when the field's own name reads wrong on the command line (a repeatable --worker for `workers`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class EngineConfig:
    """How the reference engine runs and how much memory it may take."""

    device: str = opt("cpu", "torch device of the reference engine: cpu or cuda[:N]")
    dtype: str = opt("auto", "weight and KV dtype: auto (the checkpoint's; on a cpu, bfloat16 where it has native "
                     "bfloat16 dot products, else float32), float32, bfloat16, float16",
                     choices=["auto", "float32", "bfloat16", "float16"])
    max_running: int = opt(32, "most sequences decoded together in one step")
    max_cache_tokens: int = opt(32768, "KV cache size in tokens, over all running sequences")
    block_size: int = opt(16, "KV cache block size in tokens")
    max_step_tokens: int = opt(512, "most tokens in one forward step; longer prefills are chunked")
    prefix_caching: bool = opt(True, "reuse the KV of prompt prefixes already computed (whole blocks; chat "
                                     "templates give every conversation the same header)")
    max_queue: int = opt(256, "most requests waiting for admission; past it RESOURCE_EXHAUSTED (HTTP 429)")
    engine_process: bool = opt(True, "run the reference engine in a process of its own, so the server's event loop "
                                     "never holds the GIL its steps need (off: a thread of the server's process)")
    threads: int = opt(0, "torch intra-op threads for the reference engine (0: one per core but one, which is "
                                  "left to the server's event loop and its clients)")
    grammar_threads: int = opt(1, "reference engine: grammars compiled at once, each on a thread beside the step "
                                  "loop (a request with a new schema waits for its grammar, no other stream does)")
    grammar_compile_timeout: float = opt(30.0, "reference engine: seconds a grammar may take to compile; past it "
                                               "the request, and any later one with the same constraint, is "
                                               "INVALID_ARGUMENT naming the field")


@dataclass
class TrtllmConfig:
    """The TensorRT-LLM worker `llmserve trtllm-worker` runs: settings handed to TensorRT-LLM's LLM API."""

    trt_max_batch_size: int = opt(64, "TensorRT-LLM max batch size")
    trt_max_num_tokens: int = opt(8192, "TensorRT-LLM max tokens per step")
    trt_kv_cache_fraction: float = opt(0.9, "fraction of free GPU memory TensorRT-LLM gives the KV cache")
    trt_block_reuse: bool = opt(True, "reuse KV blocks of shared prefixes")
    trt_chunked_prefill: bool = opt(True, "split long prefills across steps")
    trt_profile: str = opt("", "use this profile id instead of choosing one for the local GPUs (llmserve profiles "
                               "lists them)")


@dataclass
class WorkersConfig:
    """Models served by gRPC workers (TensorRT-LLM, vLLM, SGLang): where they are and how they are watched."""

    workers: list[str] = opt([], "a model's gRPC worker, NAME=KIND://HOST:PORT with KIND trtllm, vllm or sglang "
                                 "(repeatable; a model may have several; env comma-separated)", flag="--worker")
    worker_probe_interval: float = opt(1.0, "seconds between health and load probes of each worker")
    worker_probe_timeout: float = opt(3.0, "seconds a probe may take before the worker counts as down")
    worker_start_timeout: float = opt(600.0, "seconds to wait at start-up for the first worker of a model to answer")
    worker_affinity_slack: int = opt(4, "requests that share a prompt prefix stay on one worker (its prefix cache) "
                                        "unless it has this many more requests than the least loaded one")


@dataclass
class ServerConfig:
    """The gRPC server, the REST shim and what they accept."""

    engines_dir: Path = opt(Path("engines"), "model repository: one folder per served model")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    grpc_port: int = opt(50051, "gRPC port")
    http_port: int = opt(8000, "REST shim and /metrics port (0: no HTTP server)")
    api_key: list[str] = opt([], "accepted API keys (repeatable); none means no authentication")
    tls_cert: Path | None = opt(None, "server certificate (PEM) for TLS")
    tls_key: Path | None = opt(None, "server private key (PEM) for TLS")
    tls_client_ca: Path | None = opt(None, "CA (PEM) that client certificates must chain to: mutual TLS (needs "
                                           "--tls-cert); the same flags secure the gRPC and the HTTP port")
    open_reflection: bool = opt(False, "answer gRPC reflection without an API key even when keys are configured "
                                       "(health always answers without one)")
    grace_period: float = opt(30.0, "seconds running streams get to finish after SIGTERM")
    max_message_bytes: int = opt(4 * 1024 * 1024, "largest request accepted, in bytes")
    max_messages: int = opt(2048, "most chat messages in one request")
    max_content_chars: int = opt(1_000_000, "longest content of one message, in characters")
    max_schema_bytes: int = opt(256 * 1024, "largest JSON schema a request may constrain its output with (a "
                                            "response_format schema, or its tools' for a forced call), in bytes")
    validation_threads: int = opt(2, "threads that parse, validate, render and tokenize large requests, so that "
                                     "none of it stalls the event loop and the streams it serves")
    clamp_max_tokens: bool = opt(False, "clamp max_tokens to the context left instead of rejecting the request")
    cors_origin: list[str] = opt([], "origins allowed by CORS on the REST shim (repeatable; * for any)")
    ignore_unknown_fields: bool = opt(False, "REST: ignore unknown request fields with a warning instead of 400")
    upstream: str = opt("", "llmserve rest: the gRPC server (HOST:PORT) the standalone REST shim fronts")
    upstream_ca: Path | None = opt(None, "llmserve rest: CA (PEM) of a TLS upstream; set, the shim connects with TLS")
    upstream_cert: Path | None = opt(None, "llmserve rest: client certificate (PEM) for a mutual-TLS upstream")
    upstream_key: Path | None = opt(None, "llmserve rest: the client certificate's private key (PEM)")
    log_level: str = opt("info", "log level", choices=["debug", "info", "warning", "error"])


@dataclass
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)


def startup_problems(s: ServerConfig) -> list[str]:
    """Settings that would serve something other than what the operator asked for: refused before binding."""
    problems = []
    if s.tls_client_ca and not s.tls_cert:
        problems.append("--tls-client-ca needs --tls-cert and --tls-key: without them both ports would be plaintext")
    if bool(s.tls_cert) != bool(s.tls_key):
        problems.append("--tls-cert and --tls-key go together" + (": --tls-key is missing" if s.tls_cert
                                                                 else ": --tls-cert is missing"))
    if any(not key.strip() for key in s.api_key):
        problems.append("--api-key is empty (an unset variable in --api-key \"$KEY\"?): an empty key would accept "
                        "an empty bearer token")
    if bool(s.upstream_cert) != bool(s.upstream_key):
        problems.append("--upstream-cert and --upstream-key go together")
    if s.upstream_cert and not s.upstream_ca:
        problems.append("--upstream-cert needs --upstream-ca: a client certificate is presented over TLS only")
    if s.validation_threads < 1:
        problems.append("--validation-threads must be at least 1")
    return problems


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _base_type(tp: Any) -> Any:
    """The scalar type of a field annotation: `Path | None` -> Path, `list[str]` -> str."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return typing.get_args(tp)[0]
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


_Section = TypeVar("_Section")


def add_section(parser: argparse.ArgumentParser, section: type[Any]) -> None:
    """Adds one flag per field of a config dataclass, defaulting to its environment variable."""
    group = parser.add_argument_group(section.__name__, section.__doc__)
    hints = typing.get_type_hints(section)
    for f in dataclasses.fields(section):
        tp = hints[f.name]
        scalar = _base_type(tp)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        env = os.environ.get(_env(f.name))
        meta = dict(f.metadata)
        flag = meta.pop("flag", _flag(f.name))
        help_text = f"{meta.pop('help')} (env {_env(f.name)}; default: %(default)s)"
        if typing.get_origin(tp) is list:
            if env is not None:
                default = [v for v in env.split(",") if v]
            group.add_argument(flag, dest=f.name, type=scalar, action="append", default=None,
                               help=help_text, **meta)
            group.set_defaults(**{f"_default_{f.name}": default})
            continue
        if scalar is bool:
            if env is not None:
                try:
                    default = _parse_bool(env)
                except argparse.ArgumentTypeError as e:
                    raise SystemExit(f"{_env(f.name)}: {e}") from None
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=default, help=help_text)
            continue
        if env is not None:
            try:
                default = scalar(env)
            except ValueError:
                raise SystemExit(f"{_env(f.name)}={env!r} is not a valid {scalar.__name__}") from None
        group.add_argument(flag, dest=f.name, type=scalar, default=default, help=help_text, **meta)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The settings of `llmserve serve` (and `rest`); the TensorRT-LLM worker's are `llmserve trtllm-worker`'s."""
    for section in (ServerConfig, WorkersConfig, EngineConfig):
        add_section(parser, section)


def section_from_args(section: type[_Section], args: argparse.Namespace) -> _Section:
    values = {}
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(args, f.name)
        if value is None and hasattr(args, f"_default_{f.name}"):
            value = getattr(args, f"_default_{f.name}")
        values[f.name] = value
    return section(**values)


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        engine=section_from_args(EngineConfig, args),
        server=section_from_args(ServerConfig, args),
        workers=section_from_args(WorkersConfig, args),
    )
