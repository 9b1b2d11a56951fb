"""A real TensorRT-LLM gRPC worker behind llmserve, where TensorRT-LLM and an NVIDIA GPU are: `pytest -m gpu` in
the Dockerfile's trtllm image. Skipped elsewhere, with the reason."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import grpc
import pytest

from service.backends.workers.address import parse_address
from service.backends.workers.trtllm import TrtllmClient
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc
from service.repository.gpus import detect_gpus
from tests.helpers import ROOT, chat, free_port, running_server, worker_config

FR = chat_pb2.FinishReason


def _skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "TensorRT-LLM is not installed (the Dockerfile's trtllm image has it)"
    if not detect_gpus():
        return "no NVIDIA GPU"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


@contextmanager
def process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


async def healthy(address: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 1800) -> None:
    """Until the worker's HealthCheck says OK (a first load compiles kernels: minutes)."""
    async with grpc.aio.insecure_channel(parse_address(address).target) as channel:
        client = TrtllmClient(parse_address(address), channel)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            try:
                if (await client.health(5))[0]:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(2)
    raise TimeoutError(f"the TensorRT-LLM worker was not healthy in {timeout} s; see {log}")


@asynccontextmanager
async def gateway(engines_dir: Path, name: str, address: str) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with running_server(worker_config(engines_dir, f"{name}={address}")) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:  # type: ignore[attr-defined]
        yield chat_pb2_grpc.ChatServiceStub(channel)


async def exercise(stub: chat_pb2_grpc.ChatServiceStub, model: str) -> None:
    def req(**fields: object) -> chat_pb2.ChatCompletionRequest:
        r = chat("Tell me a story", **fields)
        r.model = model
        return r

    unary = await stub.CreateChatCompletion(req(max_tokens=8, ignore_eos=True, temperature=0))
    assert unary.choices[0].finish_reason == FR.FINISH_REASON_LENGTH and unary.usage.completion_tokens == 8
    streamed = "".join([c.delta.content async for chunk in stub.StreamChatCompletion(
        req(max_tokens=8, ignore_eos=True, temperature=0)) for c in chunk.choices])
    assert streamed == unary.choices[0].message.content
    seeded = [await stub.CreateChatCompletion(req(max_tokens=8, ignore_eos=True, seed=3, n=2)) for _ in range(2)]
    assert [c.message.content for c in seeded[0].choices] == [c.message.content for c in seeded[1].choices]
    logprobs = await stub.CreateChatCompletion(req(max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=2))
    assert all(len(e.top_logprobs) == 2 for e in logprobs.choices[0].logprobs.content)
    structured = await stub.CreateChatCompletion(
        req(max_tokens=200, seed=1, response_format=chat_pb2.ResponseFormat(type="json_object")))
    if structured.choices[0].finish_reason == FR.FINISH_REASON_STOP:
        assert isinstance(json.loads(structured.choices[0].message.content), dict)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.CreateChatCompletion(req(max_tokens=900, ignore_eos=True), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_pytorch_backend_worker_serves_the_contract(engines_dir: Path, tmp_path: Path) -> None:
    """`python -m tensorrt_llm.commands.serve CHECKPOINT --grpc` (TensorRT-LLM 1.3 and later: the PyTorch backend)."""
    options = tmp_path / "options.yaml"
    options.write_text(json.dumps({"dtype": "bfloat16", "guided_decoding_backend": "xgrammar",
                                   "max_input_len": 1024}))
    address = f"trtllm://127.0.0.1:{free_port()}"
    port = parse_address(address).port
    command = [sys.executable, "-m", "tensorrt_llm.commands.serve", str(engines_dir / "demo" / "checkpoint"),
               "--grpc", "--host", "127.0.0.1", "--port", str(port), "--backend", "pytorch", "--max_seq_len", "1024",
               "--max_batch_size", "8", "--extra_llm_api_options", str(options)]
    with process(command, tmp_path / "worker.log") as proc:
        await healthy(address, proc, tmp_path / "worker.log")
        async with gateway(engines_dir, "demo", address) as stub:
            await exercise(stub, "demo")


async def test_built_engine_through_llmserve_trtllm_worker(engines_dir: Path, tmp_path: Path) -> None:
    """build_engine.py builds a bf16 engine for this GPU; `llmserve trtllm-worker` serves it over gRPC."""
    built = subprocess.run([sys.executable, "build_engine.py", "--model", str(engines_dir / "demo" / "checkpoint"),
                            "--name", "trt-demo", "--backend", "tensorrt-llm", "--dtype", "bf16", "--gpus", "1",
                            "--max-seq-len", "1024", "--max-batch-size", "8", "--engines-dir", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert built.returncode == 0, built.stdout + built.stderr
    address = f"trtllm://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "service", "trtllm-worker", "trt-demo", "--engines-dir", str(tmp_path),
               "--host", "127.0.0.1", "--port", str(parse_address(address).port)]
    with process(command, tmp_path / "worker.log") as proc:
        await healthy(address, proc, tmp_path / "worker.log")
        async with gateway(tmp_path, "trt-demo", address) as stub:
            await exercise(stub, "trt-demo")
