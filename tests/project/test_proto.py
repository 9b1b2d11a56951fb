"""Building a client of the contract in another language, offline, from what `make proto` writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from protovalidate._gen.buf.validate import validate_pb

from tests.helpers import ROOT

BUILD = ROOT / "build" / "proto"


def protoc(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """grpcio-tools' protoc, which adds the well-known types' include path itself."""
    return subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_protoc_compiles_the_contract_from_proto_and_build_proto(tmp_path: Path) -> None:
    """What the README shows for C++, Go and Ruby (the same -I; grpcio-tools' protoc has only Python's generator
    built in, so Python's stands in): no network, no buf, no copied .proto."""
    done = protoc("-Iproto", f"-I{BUILD}", f"--python_out={tmp_path}", f"--descriptor_set_out={tmp_path}/c.binpb",
                  "proto/llmserve/v1/chat.proto")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "llmserve/v1/chat_pb2.py").is_file() and (tmp_path / "c.binpb").stat().st_size > 0
    assert protoc("-Iproto", "proto/llmserve/v1/chat.proto").returncode != 0, "the import is not found without it"


def test_the_written_validate_proto_compiles_to_protovalidates_own_descriptor(tmp_path: Path) -> None:
    out = tmp_path / "validate.binpb"
    done = protoc(f"-I{BUILD}", f"--descriptor_set_out={out}", "buf/validate/validate.proto")
    assert done.returncode == 0, done.stderr
    written = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    assert written == descriptor_pb2.FileDescriptorProto.FromString(validate_pb.desc().proto.to_binary())
