"""One pass over a request: every violation reported at once, or a validated value that nothing re-checks.

The ranges live in proto/llmserve/v1/chat.proto as protovalidate annotations
and are enforced from there, so the contract and the server cannot drift.
What annotations cannot say is checked here too, in the same pass: one field
depending on another, the operator's size limits, schemas of response formats
and tools, the chat template's objections and the context length. A request
with a bad temperature, a bad schema and a prompt too long for the model gets
all three back, each with its field path (`messages[1].role`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import protovalidate
from google.protobuf import json_format

from service.admission import Call
from service.backends.base import GenerationRequest, GuidedDecoding, SamplingParams
from service.chat.schemas import plain_json, schema_json, schema_problem
from service.chat.tools import call_schema, callable_tools, tool_mode
from service.config import ServerConfig
from service.errors import FieldViolation, ServiceError
from service.gen.llmserve.v1 import chat_pb2
from service.models.registry import ModelRegistry, ServedModel
from service.models.template import ChatTemplateError

_validator = protovalidate.Validator()
_RESPONSE_SCHEMA = "response_format.json_schema.schema"


@dataclass(frozen=True)
class ValidChat:
    """A chat request that passed validation, with its prompt rendered and every default applied."""

    model: ServedModel
    prompt: list[int]
    sampling: SamplingParams
    n: int
    guided: GuidedDecoding | None
    tool_names: list[str]  # the tools the model may call: its answers are parsed for a call of one
    logprobs: bool
    include_usage: bool

    def generation_request(self, call: Call) -> GenerationRequest:
        return GenerationRequest(call.request_id, self.prompt, self.sampling, self.n, call.deadline, self.guided)


def _field_path(violation: protovalidate.Violation) -> str:
    parts: list[str] = []
    for element in violation.proto.field.elements:
        name = element.field_name
        subscript = element.subscript
        if subscript is not None:
            name += f"[{subscript.value!r}]" if isinstance(subscript.value, str) else f"[{subscript.value}]"
        parts.append(name)
    return ".".join(parts)


def _annotation_violations(message: object) -> list[FieldViolation]:
    return [FieldViolation(_field_path(v), v.proto.message or v.proto.rule_id)
            for v in _validator.collect_violations(message)]


def _message_violations(messages: list[chat_pb2.ChatMessage], limits: ServerConfig) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if len(messages) > limits.max_messages:
        out.append(FieldViolation("messages", f"at most {limits.max_messages} messages, got {len(messages)}"))
        return out
    for i, m in enumerate(messages):
        if m.HasField("content") and len(m.content) > limits.max_content_chars:
            out.append(FieldViolation(f"messages[{i}].content",
                                      f"at most {limits.max_content_chars} characters, got {len(m.content)}"))
        if m.role == "tool" and not m.tool_call_id:
            out.append(FieldViolation(f"messages[{i}].tool_call_id", "required for a tool message"))
        if m.role in ("system", "user", "tool") and not m.HasField("content"):
            out.append(FieldViolation(f"messages[{i}].content", f"required for a {m.role} message"))
        if m.role == "assistant" and not m.HasField("content") and not m.tool_calls:
            out.append(FieldViolation(f"messages[{i}].content", "an assistant message needs content or tool_calls"))
        if m.tool_calls and m.role != "assistant":
            out.append(FieldViolation(f"messages[{i}].tool_calls", "only assistant messages make tool calls"))
    return out


def _cross_field_violations(req: chat_pb2.ChatCompletionRequest) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if req.top_logprobs > 0 and not req.logprobs:
        out.append(FieldViolation("top_logprobs", "needs logprobs set to true"))
    tool_names = {t.function.name for t in req.tools}
    if req.HasField("tool_choice"):
        choice = req.tool_choice
        if choice.WhichOneof("choice") == "function":
            if choice.function.name not in tool_names:
                known = ", ".join(sorted(tool_names)) or "none"
                out.append(FieldViolation("tool_choice.function.name",
                                          f"{choice.function.name!r} is not one of the request's tools ({known})"))
        elif choice.mode == "required" and not req.tools:
            out.append(FieldViolation("tool_choice", "'required' needs at least one tool in tools"))
    if len(tool_names) < len(req.tools):
        out.append(FieldViolation("tools", "function names must be unique"))
    if req.HasField("response_format"):
        fmt = req.response_format
        if fmt.type == "json_schema" and not fmt.json_schema.HasField("schema"):
            out.append(FieldViolation(_RESPONSE_SCHEMA, "required when type is json_schema"))
        if fmt.type in ("json_object", "json_schema") and req.tools and tool_mode(req) != "none":
            out.append(FieldViolation("response_format", "cannot be combined with tool calls; set tool_choice none"))
    return out


def _guided(req: chat_pb2.ChatCompletionRequest, tools: dict[str, dict[str, Any]],
            violations: list[FieldViolation]) -> GuidedDecoding | None:
    """The output's constraint: a mandatory tool call's schema, or the response format's."""
    if tools and tool_mode(req) in ("required", "function"):
        schema, field = call_schema(tools), "tools"
    elif req.response_format.type == "json_object":
        return GuidedDecoding(json_object=True)
    elif req.response_format.type == "json_schema" and req.response_format.json_schema.HasField("schema"):
        schema, field = plain_json(json_format.MessageToDict(req.response_format.json_schema.schema)), _RESPONSE_SCHEMA
    else:
        return None
    problem = schema_problem(schema)
    if problem:
        violations.append(FieldViolation(field, problem))
        return None
    return GuidedDecoding(json_schema=schema_json(schema))


def _refused_violations(req: chat_pb2.ChatCompletionRequest, model: ServedModel) -> list[FieldViolation]:
    """Fields the request sets that the model's engine cannot honour (a seed on SGLang workers): refused by name,
    never dropped."""
    out = []
    for name, why in model.engine.refused_fields().items():
        field = req.DESCRIPTOR.fields_by_name[name]
        if len(getattr(req, name)) if field.is_repeated else req.HasField(name):
            out.append(FieldViolation(name, why))
    return out


def render_prompt(model: ServedModel, messages: Any, tools: list[dict[str, Any]] | None = None,
                  add_generation_prompt: bool = True) -> list[int]:
    """The conversation's token ids, by the model's chat template; raises ChatTemplateError."""
    dicts = [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in messages]
    return model.template.encode(dicts, tools, add_generation_prompt)


def _renderable(violations: list[FieldViolation]) -> bool:
    """Whether the conversation itself is sound enough to render (and so to count its tokens)."""
    return not any(v.field == "messages" or v.field.startswith("messages[") for v in violations)


def _served(registry: ModelRegistry, name: str, violations: list[FieldViolation]) -> ServedModel:
    """The model, or NOT_FOUND; with other violations already found, those are the answer."""
    try:
        return registry.get(name)
    except ServiceError:
        if violations:
            raise ServiceError.invalid(violations) from None
        raise


def _max_tokens(req: chat_pb2.ChatCompletionRequest, model: ServedModel, prompt: list[int], limits: ServerConfig,
                violations: list[FieldViolation]) -> int:
    context = model.manifest.context_length
    room = context - len(prompt)
    if room <= 0:
        violations.append(FieldViolation(
            "messages", f"the prompt has {len(prompt)} tokens; the model's context length is {context}"))
        return 0
    if not req.HasField("max_tokens"):
        return room
    if req.max_tokens > room and not limits.clamp_max_tokens:
        violations.append(FieldViolation(
            "max_tokens", f"the prompt ({len(prompt)} tokens) plus max_tokens ({req.max_tokens}) exceeds the "
                          f"model's context length ({context})"))
    return min(req.max_tokens, room)


def _sampling(req: chat_pb2.ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    """Engine parameters, each unset field taking its documented default."""

    def get(name: str, default: float | int | bool) -> float | int | bool:
        return getattr(req, name) if req.HasField(name) else default

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(get("temperature", 1.0)),
        top_p=float(get("top_p", 1.0)),
        top_k=int(get("top_k", 0)),
        min_p=float(get("min_p", 0.0)),
        presence_penalty=float(get("presence_penalty", 0.0)),
        frequency_penalty=float(get("frequency_penalty", 0.0)),
        repetition_penalty=float(get("repetition_penalty", 1.0)),
        seed=int(req.seed) if req.HasField("seed") else None,
        stop=tuple(req.stop),
        ignore_eos=bool(get("ignore_eos", False)),
        logprobs=bool(get("logprobs", False)),
        top_logprobs=int(get("top_logprobs", 0)),
    )


def request_violations(req: chat_pb2.ChatCompletionRequest, limits: ServerConfig) -> list[FieldViolation]:
    """What the request alone breaks, before any model is consulted: the contract's ranges, the message rules, the
    operator's limits and the rules between fields."""
    return _annotation_violations(req) + _message_violations(list(req.messages), limits) + \
        _cross_field_violations(req)


def validate_chat(req: chat_pb2.ChatCompletionRequest, registry: ModelRegistry,
                  limits: ServerConfig) -> ValidChat:
    """Raises ServiceError naming every violation (INVALID_ARGUMENT), or NOT_FOUND for an unknown model."""
    violations = request_violations(req, limits)
    renderable = _renderable(violations)
    tools = callable_tools(req, violations)
    guided = _guided(req, tools, violations)
    model = _served(registry, req.model, violations)
    violations += _refused_violations(req, model)
    prompt: list[int] = []
    max_tokens = 0
    if renderable:
        offered = [json_format.MessageToDict(t, preserving_proto_field_name=True) for t in req.tools] \
            if req.tools and tool_mode(req) != "none" else None
        try:
            prompt = render_prompt(model, req.messages, offered)
        except ChatTemplateError as e:
            violations.append(FieldViolation(e.field, str(e)))
        else:
            max_tokens = _max_tokens(req, model, prompt, limits, violations)
    if violations:
        raise ServiceError.invalid(violations)
    return ValidChat(model, prompt, _sampling(req, max_tokens), req.n if req.HasField("n") else 1, guided,
                     list(tools), bool(req.logprobs), req.stream_options.include_usage)


def validate_tokenize(req: chat_pb2.TokenizeRequest, registry: ModelRegistry,
                      limits: ServerConfig) -> tuple[ServedModel, list[int]]:
    """The model and the token ids of the text, or of the conversation as the model's template renders it."""
    violations = _annotation_violations(req)
    if req.HasField("text") == bool(req.messages):
        violations.append(FieldViolation("text", "exactly one of text and messages must be set"))
    if req.HasField("text") and len(req.text) > limits.max_content_chars:
        violations.append(FieldViolation("text", f"at most {limits.max_content_chars} characters"))
    violations += _message_violations(list(req.messages), limits)
    renderable = _renderable(violations)
    model = _served(registry, req.model, violations)
    tokens: list[int] = []
    if req.HasField("text") and not violations:
        add_special = req.add_special_tokens if req.HasField("add_special_tokens") else False
        tokens = model.engine.tokenizer.encode(req.text, add_special_tokens=add_special)
    elif req.messages and renderable:
        add_generation_prompt = req.add_generation_prompt if req.HasField("add_generation_prompt") else True
        try:
            tokens = render_prompt(model, req.messages, add_generation_prompt=add_generation_prompt)
        except ChatTemplateError as e:
            violations.append(FieldViolation(e.field, str(e)))
    if violations:
        raise ServiceError.invalid(violations)
    return model, tokens

