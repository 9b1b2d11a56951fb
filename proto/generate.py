"""Generates the Python stubs and the descriptor image from proto/.

protovalidate's wheel embeds buf/validate/validate.proto only as a compiled
descriptor, so it is written out here and handed to protoc with
--descriptor_set_in: no third-party .proto source is committed. Clients in
other languages build offline from proto/ plus build/proto, where its source
is written back from that descriptor (proto/descriptor_source.py):
`protoc -Iproto -Ibuild/proto --cpp_out=... proto/llmserve/v1/chat.proto`.

Outputs (none committed):
  service/gen/...              Python messages, gRPC stubs and .pyi, imports made package-relative
  build/proto/llmserve.binpb   FileDescriptorSet with imports and comments (buf, Node, reflection tests)
  service/gen/llmserve.binpb   the same set, which the server's reflection serves (so comments reach grpcurl)
  build/proto/buf/validate/validate.proto   the imported protovalidate file, as source, for protoc users
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import grpc_tools
from descriptor_source import proto_source
from google.protobuf import descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2
from grpc_tools import protoc
from protovalidate._gen.buf.validate import validate_pb

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILES = ["llmserve/v1/chat.proto"]
VALIDATE_PROTO = "buf/validate/validate.proto"
WELL_KNOWN = Path(grpc_tools.__file__).parent / "_proto"


def validate_file() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(validate_pb.desc().proto.to_binary())


def write_validate_descriptor(path: Path) -> None:
    fds = descriptor_pb2.FileDescriptorSet()
    fds.file.append(validate_file())
    path.write_bytes(fds.SerializeToString())


def write_validate_source(include_dir: Path) -> Path:
    """buf/validate/validate.proto under include_dir, for `protoc -Iproto -I<include_dir>`."""
    path = include_dir / VALIDATE_PROTO
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(proto_source(validate_file(), [descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2]))
    return path


def run_protoc(args: list[str]) -> None:
    if protoc.main(["protoc", *args]) != 0:
        sys.exit(f"protoc failed: {' '.join(args)}")


def build_image(proto_dir: Path, deps: Path, out: Path) -> None:
    """A self-contained FileDescriptorSet of the contract, as buf and grpc-js read it."""
    run_protoc([
        f"--descriptor_set_in={deps}", f"-I{proto_dir}", f"-I{WELL_KNOWN}",
        "--include_imports", "--include_source_info", f"--descriptor_set_out={out}", *PROTO_FILES,
    ])


def generate_python(deps: Path, out_pkg: Path) -> None:
    tmp = out_pkg.with_name(out_pkg.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run_protoc([
        f"--descriptor_set_in={deps}", f"-I{PROTO_DIR}", f"-I{WELL_KNOWN}",
        f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
        *PROTO_FILES, VALIDATE_PROTO,
    ])
    (tmp / "buf/validate/validate_pb2_grpc.py").unlink()
    package = ".".join(out_pkg.relative_to(ROOT).parts)
    # Generated code imports its dependencies as top-level packages (`from buf.validate
    # import ...`); rewrite them under our package so nothing touches sys.path.
    pattern = re.compile(r"^from (llmserve\.v1|buf\.validate) import", re.MULTILINE)
    for f in tmp.rglob("*.py*"):
        f.write_text(pattern.sub(rf"from {package}.\1 import", f.read_text()))
    for d in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    shutil.rmtree(out_pkg, ignore_errors=True)
    tmp.rename(out_pkg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-only", type=Path, metavar="PROTO_DIR",
                        help="only write the image of the contract found in PROTO_DIR (used by buf breaking)")
    parser.add_argument("--out", type=Path, default=ROOT / "build/proto/llmserve.binpb")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    deps = args.out.parent / "buf-validate.binpb"
    write_validate_descriptor(deps)
    if args.image_only:
        build_image(args.image_only, deps, args.out)
        return
    build_image(PROTO_DIR, deps, args.out)
    generate_python(deps, ROOT / "service/gen")
    shutil.copyfile(args.out, ROOT / "service/gen/llmserve.binpb")
    source = write_validate_source(args.out.parent)
    print(f"generated service/gen, {args.out.relative_to(ROOT)} and {source.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
