"""Request validation: the contract's own annotations, then the rules beside them.

The ranges live in proto/llmserve/v1/chat.proto as protovalidate annotations
and are enforced from there, so the contract and the server cannot drift.
What annotations cannot say (one field depending on another, the operator's
size limits) is checked here, and every violation is reported at once with
its field path, e.g. `messages[1].role`.
"""

from __future__ import annotations

import protovalidate

from service.backends.base import SamplingParams
from service.config import ServerConfig
from service.errors import FieldViolation, ServiceError
from service.gen.llmserve.v1 import chat_pb2

_validator = protovalidate.Validator()


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
            out.append(FieldViolation("response_format.json_schema.schema", "required when type is json_schema"))
        if fmt.type in ("json_object", "json_schema") and req.tools and tool_mode(req) != "none":
            out.append(FieldViolation("response_format", "cannot be combined with tool calls; set tool_choice none"))
    return out


def tool_mode(req: chat_pb2.ChatCompletionRequest) -> str:
    """The effective tool_choice: "none", "auto", "required", or "function"."""
    if not req.HasField("tool_choice"):
        return "auto" if req.tools else "none"
    kind = req.tool_choice.WhichOneof("choice")
    return "function" if kind == "function" else req.tool_choice.mode




def validate_chat_request(req: chat_pb2.ChatCompletionRequest, limits: ServerConfig) -> None:
    violations = _annotation_violations(req) + _message_violations(list(req.messages), limits)
    violations += _cross_field_violations(req)
    if violations:
        raise ServiceError.invalid(violations)


def validate_tokenize_request(req: chat_pb2.TokenizeRequest, limits: ServerConfig) -> None:
    violations = _annotation_violations(req)
    if req.HasField("text") == bool(req.messages):
        violations.append(FieldViolation("text", "exactly one of text and messages must be set"))
    if req.HasField("text") and len(req.text) > limits.max_content_chars:
        violations.append(FieldViolation("text", f"at most {limits.max_content_chars} characters"))
    violations += _message_violations(list(req.messages), limits)
    if violations:
        raise ServiceError.invalid(violations)


def sampling_params(req: chat_pb2.ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    """Engine parameters for a validated request, each unset field taking its documented default."""

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
