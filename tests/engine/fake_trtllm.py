"""A fake of TensorRT-LLM's LLM API runtime, for CPU tests of the backend around it.

TensorRT-LLM cannot run here (no GPU, and PyPI holds only stubs), so this stands
in for exactly what the backend touches, in the shapes of the 1.x sources
(tensorrt_llm/executor/result.py): `generate_async(prompt_token_ids,
sampling_params=..., streaming=True)` returns a result iterated with
`async for`, whose `.outputs` are CompletionOutputs with cumulative `token_ids`
and `logprobs` and a `finish_reason` of "stop", "length" or "cancelled", and
whose `abort()` makes the next step finish every choice as "cancelled". Its
parameter classes accept only the field names of the pinned release (the
fixture files), so a misspelt or missing field fails the test as it would fail
on a GPU.

The fake "model" emits a fixed script of token ids per choice, one token per step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def release_fields(name: str) -> frozenset[str]:
    lines = (FIXTURES / name).read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


SAMPLING_FIELDS = release_fields("trtllm-sampling-params.txt")
GUIDED_FIELDS = release_fields("trtllm-guided-decoding-params.txt")


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - SAMPLING_FIELDS
        if unknown:
            raise TypeError(f"SamplingParams.__init__() got unexpected keyword arguments {sorted(unknown)}")
        self.kwargs = kwargs


class FakeGuidedDecodingParams:
    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - GUIDED_FIELDS
        if unknown:
            raise TypeError(f"GuidedDecodingParams.__init__() got unexpected keyword arguments {sorted(unknown)}")
        if sum(bool(v) for v in kwargs.values()) > 1:
            raise ValueError("Only one guide can be used for a request")
        self.kwargs = kwargs


@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None


@dataclass
class FakeCompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, FakeLogprob]] = field(default_factory=list)
    finish_reason: str | None = None


class FakeGenerationResult:
    def __init__(self, llm: FakeTrtllmLLM, prompt: list[int], params: FakeSamplingParams) -> None:
        self.prompt_token_ids = prompt
        self.sampling_params = params
        self.outputs = [FakeCompletionOutput(i) for i in range(params.kwargs.get("n", 1))]
        self.aborted = False
        self._llm = llm
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        self.aborted = True

    def __aiter__(self) -> FakeGenerationResult:
        return self

    async def __anext__(self) -> FakeGenerationResult:
        if self._done:
            raise StopAsyncIteration
        await asyncio.sleep(self._llm.step_seconds)
        if self.aborted:
            for out in self.outputs:
                out.finish_reason = out.finish_reason or "cancelled"
            self._done = True
            return self
        max_tokens = self.sampling_params.kwargs["max_tokens"]
        top = self.sampling_params.kwargs.get("logprobs")
        for out in self.outputs:
            if out.finish_reason:
                continue
            script = self._llm.scripts[out.index % len(self._llm.scripts)]
            token = script[min(len(out.token_ids), len(script) - 1)]   # ignore_eos runs on, repeating the last
            out.token_ids.append(token)
            if top:
                out.logprobs.append({token: FakeLogprob(-0.25, 1), token + 1: FakeLogprob(-1.5, 2)})
            if len(out.token_ids) >= max_tokens:
                out.finish_reason = "length"
            elif len(out.token_ids) == len(script) and not self.sampling_params.kwargs.get("ignore_eos"):
                out.finish_reason = "stop"
        self._done = all(out.finish_reason for out in self.outputs)
        return self


class FakeTrtllmLLM:
    """Records every request and the results it handed out; `shutdown` is recorded too."""

    def __init__(self, scripts: list[list[int]], step_seconds: float = 0.002) -> None:
        self.scripts = scripts
        self.step_seconds = step_seconds
        self.max_input_len = 1 << 20
        self.results: list[FakeGenerationResult] = []
        self.shut_down = False

    def generate_async(self, inputs: list[int], sampling_params: FakeSamplingParams,
                       streaming: bool = False) -> FakeGenerationResult:
        assert streaming, "the backend streams"
        if len(inputs) > self.max_input_len:   # as LLM._check_arguments refuses prompts past the engine's limits
            raise ValueError(f"The prompt length ({len(inputs)}) should not exceed max_input_len "
                             f"({self.max_input_len})")
        result = FakeGenerationResult(self, inputs, sampling_params)
        self.results.append(result)
        return result

    def shutdown(self) -> None:
        self.shut_down = True


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
    root.SamplingParams = FakeSamplingParams
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = llmapi.BuildConfig = llmapi.QuantConfig = FakeConfig
    llmapi.GuidedDecodingParams = FakeGuidedDecodingParams
    llmapi.QuantAlgo = types.SimpleNamespace(FP8="FP8")
    engine = types.ModuleType("tensorrt_llm._tensorrt_engine")
    engine.LLM = FakeTrtLLM
    tensorrt = types.ModuleType("tensorrt")
    tensorrt.__version__ = "10.13.2"
    root.llmapi, root._tensorrt_engine = llmapi, engine
    return {"tensorrt_llm": root, "tensorrt_llm.llmapi": llmapi, "tensorrt_llm._tensorrt_engine": engine,
            "tensorrt": tensorrt}
