"""Server reflection that keeps the contract's comments, so `grpcurl describe` shows defaults and rules.

grpc's reflection serves files from the compiled-in descriptors, which carry
no source info: a gRPC user would see `optional int32 n = 9` but not "Number of
choices, 1 to 4. Default: 1.", nor the rules that relate two fields. `make
proto` writes the contract's descriptor set with its source info next to the
generated code; the files found there are served as written.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from grpc_reflection.v1alpha.reflection import SERVICE_NAME

import service.gen

DOCUMENTED = Path(service.gen.__file__).parent / "llmserve.binpb"  # written by proto/generate.py


def _without_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    """protoc records each field's lowerCamel json_name; the compiled-in descriptors reflection served before
    carry none, so grpcurl wrote the fields as the contract spells them (OpenAI's snake_case), and still does."""
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _without_json_names(message.nested_type)


def documented_files(path: Path = DOCUMENTED) -> dict[str, bytes]:
    """Each file of the descriptor set, serialized with its comments, by name."""
    files = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes()).file
    for f in files:
        _without_json_names(f.message_type)
    return {f.name: f.SerializeToString() for f in files}


class DocumentedReflection(ReflectionServicer):
    def __init__(self, service_names: Iterable[str], documented: dict[str, bytes]) -> None:
        super().__init__(service_names)
        self._documented = documented

    async def ServerReflectionInfo(self, request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
                                   context: grpc.aio.ServicerContext,
                                   ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                for i, raw in enumerate(files):
                    name = descriptor_pb2.FileDescriptorProto.FromString(raw).name
                    files[i] = self._documented.get(name, raw)
            yield response


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    servicer = DocumentedReflection([*service_names, SERVICE_NAME], documented_files())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
