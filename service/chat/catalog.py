"""ListModels and Tokenize: what is served, and what a prompt costs in tokens."""

from __future__ import annotations

from service.chat.validation import validate_tokenize
from service.config import ServerConfig
from service.gen.llmserve.v1 import chat_pb2
from service.models.registry import ModelRegistry


def list_models(registry: ModelRegistry) -> chat_pb2.ListModelsResponse:
    out = chat_pb2.ListModelsResponse(object="list")
    for model in registry:
        profile, structured = model.engine.profile, model.engine.structured_output
        out.data.add(
            id=model.name, object="model", created=model.manifest.created, owned_by=model.manifest.owned_by,
            context_length=model.manifest.context_length, backend=model.manifest.backend,
            profile=chat_pb2.ModelProfile(id=profile.id, gpu_architecture=profile.gpu_architecture,
                                          precision=profile.precision,
                                          tensor_parallel_size=profile.tensor_parallel_size),
            tool_format=model.template.tool_format,
            workers=[chat_pb2.ModelWorker(address=w.address, kind=w.kind, serving=w.healthy, detail=w.detail,
                                          requests_in_flight=w.in_flight) for w in model.engine.workers()],
            structured_output=chat_pb2.StructuredOutputSupport(
                forms=structured.forms, closes_within_max_tokens=structured.closes_within_max_tokens),
        )
    return out


def tokenize(registry: ModelRegistry, req: chat_pb2.TokenizeRequest, limits: ServerConfig) -> chat_pb2.TokenizeResponse:
    model, tokens = validate_tokenize(req, registry, limits)
    return chat_pb2.TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=model.manifest.context_length)
