"""A fake `tensorrt_llm` package for CPU tests of what llmserve does with TensorRT-LLM's Python API: building engines
(service/repository/build/trtllm.py). TensorRT-LLM cannot run here (no GPU, and PyPI holds only stubs).

Its LLM constructors accept only the field names of the pinned release's BaseLlmArgs (tests/fixtures/
trtllm-llm-args.txt), as the real model forbids extras, so a misspelt argument fails here as it would on a GPU;
the same list checks the options `llmserve trtllm-worker` hands trtllm-serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def release_fields(name: str) -> frozenset[str]:
    lines = (FIXTURES / name).read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


LLM_ARGS_FIELDS = release_fields("trtllm-llm-args.txt")
# The TensorRT flow's own arguments (TrtLlmArgs), on top of BaseLlmArgs.
TRT_FLOW_ARGS = frozenset({"build_config", "quant_config"})


class FakeConfig:
    """KvCacheConfig, BuildConfig, QuantConfig: only their keyword arguments matter here."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeLLMConstructor:
    """`tensorrt_llm.LLM` / `tensorrt_llm._tensorrt_engine.LLM`: records its arguments, refuses unknown ones
    (BaseLlmArgs forbids extras), and `save` writes an engine file as a build would."""

    allowed = LLM_ARGS_FIELDS
    created: ClassVar[list[FakeLLMConstructor]] = []

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - self.allowed
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown LLM arguments {sorted(unknown)}")
        self.kwargs = kwargs
        self.shut_down = False
        FakeLLMConstructor.created.append(self)

    def save(self, engine_dir: str) -> None:
        (Path(engine_dir) / "rank0.engine").write_bytes(b"fake engine")

    def shutdown(self) -> None:
        self.shut_down = True


class FakeTorchLLM(FakeLLMConstructor):
    pass


class FakeTrtLLM(FakeLLMConstructor):
    allowed = LLM_ARGS_FIELDS | TRT_FLOW_ARGS


def fake_tensorrt_llm_modules() -> dict[str, Any]:
    """sys.modules entries standing in for the tensorrt_llm package (and tensorrt) where they cannot be installed."""
    import types

    root = types.ModuleType("tensorrt_llm")
    root.__version__ = "1.2.0"
    root.LLM = FakeTorchLLM
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = llmapi.BuildConfig = llmapi.QuantConfig = FakeConfig
    llmapi.QuantAlgo = types.SimpleNamespace(FP8="FP8")
    engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
    engine.LLM = FakeTrtLLM
    tensorrt = types.ModuleType("tensorrt")
    tensorrt.__version__ = "10.13.2"
    root.llmapi, root._tensorrt_engine = llmapi, engine
    return {"tensorrt_llm": root, "tensorrt_llm.llmapi": llmapi, "tensorrt_llm._tensorrt_engine": engine,
            "tensorrt": tensorrt}
