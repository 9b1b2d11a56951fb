"""A model's tokenizer from its worker: GetTokenizer streams a zip of the tokenizer files, unpacked here.

vLLM and SGLang serve the files their tokenizer was loaded from
(tokenizer.json, tokenizer_config.json with the chat template,
generation_config.json with the end-of-turn ids, ...) in 64 KiB chunks, the
last one carrying the sha256 of the whole zip. So a model given by nothing
but `--worker NAME=KIND://HOST:PORT` renders prompts and detokenizes exactly
as its worker's own tokenizer would. TensorRT-LLM's worker does not implement
the call: such a model needs a folder with its tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path, PurePosixPath

import grpc

from service.backends.workers.protocol import WorkerClient

MAX_BUNDLE_BYTES = 1 << 30   # a tokenizer, not weights: 128k-token vocabularies zip to ~10 MB


class TokenizerUnavailable(RuntimeError):
    pass


async def fetch_tokenizer(client: WorkerClient, model: str, into: Path, timeout: float) -> None:
    """Writes the worker's tokenizer files into the folder `into`; raises TokenizerUnavailable saying why not."""
    try:
        chunks = await client.tokenizer_bundle(timeout)
    except grpc.aio.AioRpcError as e:
        hint = (f"{client.kind} workers do not serve their tokenizer" if e.code() == grpc.StatusCode.UNIMPLEMENTED
                else f"GetTokenizer failed: {e.code().name}: {e.details()}")
        raise TokenizerUnavailable(
            f"model {model!r}: {hint} ({client.address}); give the model a folder in --engines-dir holding its "
            f"tokenizer and a manifest (backend \"workers\")") from None
    data = b"".join(chunk.data for chunk in chunks)
    digest = next((chunk.sha256 for chunk in reversed(chunks) if chunk.sha256), "")
    if digest and hashlib.sha256(data).hexdigest() != digest:
        raise TokenizerUnavailable(f"model {model!r}: the tokenizer bundle from {client.address} fails its sha256")
    unpack(data, into, f"the tokenizer bundle from {client.address}")


def unpack(data: bytes, into: Path, what: str) -> None:
    """Unzips into `into`, refusing names that would land outside it and bundles past MAX_BUNDLE_BYTES."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise TokenizerUnavailable(f"{what} is not a zip file: {e}") from None
    with archive:
        members = archive.infolist()
        if sum(m.file_size for m in members) > MAX_BUNDLE_BYTES:
            raise TokenizerUnavailable(f"{what} unpacks to more than {MAX_BUNDLE_BYTES} bytes")
        for member in members:
            path = PurePosixPath(member.filename)
            if path.is_absolute() or ".." in path.parts:
                raise TokenizerUnavailable(f"{what} holds a file outside its folder: {member.filename!r}")
        if not members:
            raise TokenizerUnavailable(f"{what} is empty")
        archive.extractall(into)
