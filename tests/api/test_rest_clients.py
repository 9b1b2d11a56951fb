"""Real clients against the REST shim: the OpenAI SDKs (Python, Node), LangChain's ChatNVIDIA, and the
request bodies and client snippets of the providers' docs in ../shared/reference/, sent verbatim."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest

from service.repository.manifest import load_manifest, write_manifest
from tests.helpers import ROOT, running_server, server_config, sse_events

REFERENCE = ROOT.parent / "shared" / "reference"
KEY = "reference-key"
HI = [{"role": "user", "content": "Hi"}]


async def run(*cmd: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
              timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=cwd, env={**os.environ, **(env or {})},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


def base_url(server: Any) -> str:
    return f"http://127.0.0.1:{server.config.server.http_port}/v1"


# --- the SDKs, against the demo model --------------------------------------------------------------------------

def _sync_calls(url: str) -> dict[str, Any]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
    seen: dict[str, Any] = {"models": [m.id for m in client.models.list()]}
    seen["completion"] = client.chat.completions.create(model="demo", messages=HI, max_tokens=5, seed=8,
                                                        extra_body={"ignore_eos": True})
    for name, kwargs in (("bad", {"temperature": 3}), ("missing", {"model": "gpt-9"})):
        try:
            client.chat.completions.create(**{"model": "demo", "messages": HI, **kwargs})
        except openai.APIStatusError as e:
            seen[name] = e
    return seen


async def test_openai_python_sync(server: Any) -> None:
    seen = await asyncio.to_thread(_sync_calls, base_url(server))  # the server runs in this event loop
    assert seen["models"] == ["demo"]
    completion = seen["completion"]
    assert completion.object == "chat.completion" and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 5 and completion.choices[0].message.role == "assistant"
    bad, missing = seen["bad"], seen["missing"]
    assert isinstance(bad, openai.BadRequestError) and bad.param == "temperature" and bad.code == "invalid_argument"
    assert isinstance(missing, openai.NotFoundError) and "demo" in missing.message


async def test_openai_python_async_and_streaming(server: Any) -> None:
    client = openai.AsyncOpenAI(base_url=base_url(server), api_key="unused", max_retries=0)
    request = {"model": "demo", "messages": HI, "max_tokens": 10, "seed": 31, "extra_body": {"ignore_eos": True}}
    unary = await client.chat.completions.create(**request)
    stream = await client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert [m.id async for m in client.models.list()] == ["demo"]
    await client.close()


async def test_openai_node_sdk_streams_with_for_await(server: Any) -> None:
    node = shutil.which("node")
    assert node and (ROOT / "tests/node/node_modules/openai").is_dir(), "run `make node-deps`"
    code, out, err = await run(node, "tests/node/openai_client.mjs", base_url(server), "unused", "demo")
    assert code == 0, err
    seen = json.loads(out)
    assert seen["models"] == ["demo"]
    assert seen["stream_text"] == seen["unary_text"], "same seed, same text, streamed or not"
    assert seen["unary_finish"] == seen["stream_finish"] == "length"
    assert seen["unary_usage"]["completion_tokens"] == seen["stream_usage"]["completion_tokens"] == 12
    assert seen["stream_first_role"] == "assistant"
    assert {k: seen["error"][k] for k in ("status", "type", "param", "code")} == {
        "status": 400, "type": "invalid_request_error", "param": "temperature", "code": "invalid_argument"}


def _langchain_calls(url: str) -> tuple[Any, list[Any]]:
    from langchain_nvidia_ai_endpoints import ChatNVIDIA

    llm = ChatNVIDIA(model="demo", base_url=url, api_key="unused", temperature=0.5, top_p=0.9, max_completion_tokens=6,
                     seed=5)
    return llm.invoke([{"role": "user", "content": "Hi"}]), list(llm.stream("Hi"))


async def test_langchain_chat_nvidia(server: Any) -> None:
    reply, chunks = await asyncio.to_thread(_langchain_calls, base_url(server))
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    usage = reply.response_metadata["token_usage"]
    assert 0 < usage["completion_tokens"] <= 6 and usage["total_tokens"] > usage["completion_tokens"]
    assert "".join(c.content for c in chunks) == reply.content, "same seed, same text, streamed or not"


# --- the providers' docs, verbatim -----------------------------------------------------------------------------

# Each documented model name is served as an alias of the demo model. Context lengths are small so that
# requests without max_tokens ("until the context is full") finish quickly on a CPU.
ALIASES = {
    "codellama/CodeLlama-70b-Instruct-hf": 288,      # deepinfra: the longest documented prompt is 260 tokens
    "meta/codellama-70b": 512,
    "meta/llama2-70b": 512,
    "nvidia/llama-3.1-nemotron-70b-instruct": 96,
    "meta/llama-3.1-70b-instruct": 128,              # dataoorts asks for 512 tokens: clamped to the context
}


@pytest.fixture(scope="module")
async def reference_server(engines_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} (the providers' docs) is not on this machine")
    demo = load_manifest((engines_dir / "demo").resolve())
    aliases = tmp_path_factory.mktemp("aliases")
    for name, context in ALIASES.items():
        root = aliases / name.replace("/", "--")
        root.mkdir()
        (root / "checkpoint").symlink_to(demo.checkpoint.resolve())
        write_manifest(replace(demo, root=root, name=name, context_length=context, checkpoint=root / "checkpoint",
                               chat_template=None, pricing=None, profiles=None))
    async with running_server(server_config(aliases, api_key=[KEY], clamp_max_tokens=True)) as srv:
        yield srv


def doc(name: str) -> str:
    return (REFERENCE / name).read_text()


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def curl_commands(text: str) -> list[str]:
    """Every `curl ...` shell command, continuation lines and multi-line quotes included."""
    commands, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("curl "):
            continue
        j = i
        while True:
            command = "\n".join(lines[i:j + 1])
            try:
                shlex.split(command)
                complete = not command.endswith("\\")
            except ValueError:
                complete = False
            if complete:
                commands.append(command)
                break
            j += 1
    return commands


def fill_nvidia_template(code: str, model: str) -> str:
    """build.nvidia.com's snippets leave the values blank (`temperature=,`); fill only those blanks."""
    for name, value in (("temperature", "0.5"), ("top_p", "0.7"), ("max_tokens", "16")):
        code = re.sub(rf'(\b{name}"?\s*[:=]\s*),', rf"\g<1>{value},", code)
    code = re.sub(r"\bstream=NaN", "stream=False", code)
    code = re.sub(r'(\bstream"?\s*:\s*),', r"\g<1>false,", code)
    code = re.sub(r'("stream":)\s*\n}', r'\1 false\n}', code)
    code = re.sub(r'(\bmodel\s*[=:]\s*)""', rf'\1"{model}"', code)
    return code.replace('"content":""', '"content":"Write a haiku about GPUs."')


async def run_python(code: str) -> str:
    rc, out, err = await run(sys.executable, "-c", code)
    assert rc == 0, err
    return out


async def run_node(code: str, tmp: Path) -> str:
    node = shutil.which("node")
    assert node, "node is needed for the Node snippets"
    (tmp / "node_modules").symlink_to(ROOT / "tests/node/node_modules")
    (tmp / "snippet.mjs").write_text(code)
    rc, out, err = await run(node, "snippet.mjs", cwd=tmp)
    assert rc == 0, err
    return out


async def run_bash(command: str, env: dict[str, str]) -> str:
    rc, out, err = await run("bash", "-c", command, env=env)
    assert rc == 0, err
    return out


@pytest.mark.parametrize("page,model", [("nvidia-build-codellama-70b.md", "meta/codellama-70b"),
                                        ("nvidia-build-llama2-70b.md", "meta/llama2-70b")])
async def test_nvidia_build_snippets(reference_server: Any, tmp_path: Path, page: str, model: str) -> None:
    url = base_url(reference_server)
    text = doc(page).replace("https://integrate.api.nvidia.com/v1", url)
    openai_py, langchain_py = (fill_nvidia_template(c, model).replace("$NVIDIA_API_KEY", KEY)
                               for c in fenced(text, "python"))
    langchain_py = langchain_py.replace("ChatNVIDIA(\n", f'ChatNVIDIA(\nbase_url="{url}",\n')
    [js] = (fill_nvidia_template(c, model).replace("$NVIDIA_API_KEY", KEY) for c in fenced(text, "javascript"))
    [curl] = (fill_nvidia_template(c, model) for c in fenced(text, "bash"))
    outputs = await asyncio.gather(run_python(openai_py), run_python(langchain_py), run_node(js, tmp_path),
                                   run_bash(curl, {"NVIDIA_API_KEY": KEY}))
    assert outputs[0].startswith("ChatCompletionMessage(content=") and "role='assistant'" in outputs[0]
    reply = json.loads(outputs[3])
    assert reply["object"] == "chat.completion" and reply["model"] == model
    assert 0 < reply["usage"]["completion_tokens"] <= 16


async def test_deepinfra_curl_bodies(reference_server: Any) -> None:
    commands = curl_commands(doc("deepinfra-codellama-70b-instruct.md"))
    assert len(commands) == 3
    local = [c.replace("https://api.deepinfra.com/v1/openai", base_url(reference_server)) for c in commands]
    hello, conversation, streamed = await asyncio.gather(*(run_bash(c, {"DEEPINFRA_TOKEN": KEY}) for c in local))
    for out in (hello, conversation):
        reply = json.loads(out)
        assert reply["object"] == "chat.completion" and reply["model"] == "codellama/CodeLlama-70b-Instruct-hf"
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
        usage = reply["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"] <= 288
    assert json.loads(conversation)["usage"]["prompt_tokens"] > json.loads(hello)["usage"]["prompt_tokens"]
    events = sse_events(streamed.encode())
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_aimlapi_requests_snippet(reference_server: Any) -> None:
    [code] = fenced(doc("aimlapi-llama-3.1-nemotron-70b.md"), "python")
    code = code.replace("https://api.aimlapi.com/v1", base_url(reference_server)).replace("<YOUR_AIMLAPI_KEY>", KEY)
    reply = ast.literal_eval(await run_python(code))
    assert reply["object"] == "chat.completion" and reply["model"] == "nvidia/llama-3.1-nemotron-70b-instruct"
    assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["total_tokens"] <= 96


async def test_dataoorts_requests_snippet(reference_server: Any) -> None:
    [code] = fenced(doc("dataoorts-llama-3.1-70b-instruct.md"), "python")
    local = base_url(reference_server).removesuffix("/v1") + "/api/v1"
    code = code.replace("https://cloud.dataoorts.com/api/v1", local).replace("$Dataoorts_Serverless_API_KEY", KEY)
    reply = json.loads(await run_python(code))
    assert reply["success"] is True and reply["errors"] == [] and reply["messages"] == []
    usage = reply["result"]["usage"]
    assert isinstance(reply["result"]["response"], str)
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"] <= 128
