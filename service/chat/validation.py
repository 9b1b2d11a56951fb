"""One pass over a request: every violation reported at once, or a validated value that nothing re-checks.

The ranges live in proto/llmserve/v1/chat.proto as protovalidate annotations
and are enforced from there, so the contract and the server cannot drift.
What annotations cannot say is checked here too, in the same pass: one field
depending on another, the operator's size limits, schemas of response formats
and tools, the chat template's objections, token ids of logit_bias and the
context length. A request with a bad temperature, a bad schema and a prompt
too long for the model gets all three back, each with its field path
(`messages[1].role`). The operator's size limits are checked first: a request
past them is answered before anything renders or tokenizes it. It runs in the
worker pool (service.worker_pool), never on the event loop. One file, past the usual
length, on purpose: every rule a request must pass is here, in the order it is
checked (as TGI's validation.rs), so nothing after it has to check again.

OpenAI's older and newer spellings are served as one: role "developer" is a
system turn, `functions`/`function_call` are tools/tool_choice, and
`max_completion_tokens` is max_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import protovalidate
from google.protobuf import json_format

from service.admission import Call
from service.backends.base import GenerationRequest, GuidedDecoding, SamplingParams
from service.chat.schemas import grammar_problem, request_schema, schema_json, schema_problem, size_problem
from service.chat.tools import callable_tools, forced_call, offered_tools, tool_mode, tool_parameters
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
    budget_field: str = "max_tokens"  # or max_completion_tokens, as the request named it: refusals name it so

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


def _size_violations(messages: list[chat_pb2.ChatMessage], limits: ServerConfig) -> list[FieldViolation]:
    """The operator's limits, cheap to check, so that a request past them costs no further work."""
    if len(messages) > limits.max_messages:
        return [FieldViolation("messages", f"at most {limits.max_messages} messages, got {len(messages)}")]
    return [FieldViolation(f"messages[{i}].content", f"at most {limits.max_content_chars} characters, got "
                                                     f"{len(m.content)}")
            for i, m in enumerate(messages) if len(m.content) > limits.max_content_chars]


def _message_violations(messages: list[chat_pb2.ChatMessage]) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    for i, m in enumerate(messages):
        if m.role == "tool" and not m.tool_call_id:
            out.append(FieldViolation(f"messages[{i}].tool_call_id", "required for a tool message"))
        if m.role in ("system", "developer", "user", "tool") and not m.HasField("content"):
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
    if req.tools and req.functions:
        out.append(FieldViolation("functions", "send tools or functions (their older form), not both"))
    if req.HasField("tool_choice") and req.HasField("function_call"):
        out.append(FieldViolation("function_call", "send tool_choice or function_call (its older form), not both"))
    if req.HasField("max_tokens") and req.HasField("max_completion_tokens") and \
            req.max_tokens != req.max_completion_tokens:
        out.append(FieldViolation("max_completion_tokens", "conflicts with max_tokens; send one of them"))
    json_format_set = req.response_format.type in ("json_object", "json_schema")
    if req.HasField("response_format"):
        fmt = req.response_format
        if fmt.type == "json_schema" and not fmt.json_schema.HasField("schema") and not fmt.json_schema.schema_json:
            out.append(FieldViolation(_RESPONSE_SCHEMA, "required when type is json_schema"))
        if json_format_set and req.tools and tool_mode(req) != "none":
            out.append(FieldViolation("response_format", "cannot be combined with tool calls; set tool_choice none"))
    if req.HasField("structured_outputs"):
        if json_format_set:
            out.append(FieldViolation("structured_outputs", "cannot be combined with a JSON response_format"))
        if req.tools and tool_mode(req) != "none":
            out.append(FieldViolation("structured_outputs", "cannot be combined with tool calls; set tool_choice "
                                                            "none"))
    return out


def _response_format(req: chat_pb2.ChatCompletionRequest, limits: ServerConfig,
                     violations: list[FieldViolation]) -> GuidedDecoding | None:
    """The output's constraint response_format or structured_outputs asks for (forced tool calls depend on the
    model: _guided)."""
    if req.response_format.type == "json_object":
        return GuidedDecoding(json_object=True, field="response_format")
    if req.HasField("structured_outputs"):
        return _structured_outputs(req.structured_outputs, violations)
    if req.response_format.type != "json_schema":
        return None
    given = req.response_format.json_schema
    schema, field = request_schema(given.schema if given.HasField("schema") else None, given.schema_json,
                                   _RESPONSE_SCHEMA, violations)
    if schema is None:
        return None
    text = schema_json(schema)
    problem = size_problem(text, limits.max_schema_bytes) or schema_problem(schema)
    if problem:
        violations.append(FieldViolation(field, problem))
        return None
    return GuidedDecoding(json_schema=text, field=field)


def _structured_outputs(given: chat_pb2.StructuredOutputs, violations: list[FieldViolation]) -> GuidedDecoding | None:
    """A regex or a grammar xgrammar refuses is named here; a choice always compiles. Not exactly one of them set
    is an annotation's violation, already reported."""
    if bool(given.regex) + bool(given.choice) + bool(given.grammar) != 1:
        return None
    if given.choice:
        return GuidedDecoding(choice=tuple(given.choice), field="structured_outputs.choice")
    kind, text, field = ("regex", given.regex, "structured_outputs.regex") if given.regex else \
        ("ebnf", given.grammar, "structured_outputs.grammar")
    problem = grammar_problem(kind, text)
    if problem:
        violations.append(FieldViolation(field, problem))
        return None
    return GuidedDecoding(regex=text, field=field) if kind == "regex" else GuidedDecoding(ebnf=text, field=field)


def _with_functions_as_tools(req: chat_pb2.ChatCompletionRequest) -> chat_pb2.ChatCompletionRequest:
    """A request that used OpenAI's deprecated functions/function_call, as the tools/tool_choice it stands for."""
    if not req.functions and not req.HasField("function_call"):
        return req
    out = chat_pb2.ChatCompletionRequest()
    out.CopyFrom(req)
    if not req.tools:
        for function in req.functions:
            out.tools.add(type="function", function=function)
    if not req.HasField("tool_choice") and req.HasField("function_call"):
        out.tool_choice.CopyFrom(req.function_call)
    return out


def _for_template(message: chat_pb2.ChatMessage) -> dict[str, Any]:
    turn = json_format.MessageToDict(message, preserving_proto_field_name=True)
    if turn.get("role") == "developer":  # OpenAI's newer name; the models' templates know "system"
        turn["role"] = "system"
    return turn


def _guided(req: chat_pb2.ChatCompletionRequest, tools: dict[str, dict[str, Any]], model: ServedModel,
            response_format: GuidedDecoding | None, limits: ServerConfig,
            violations: list[FieldViolation]) -> GuidedDecoding | None:
    """The output's constraint: a mandatory tool call, as the model's tool format writes it, or the response
    format's (or structured_outputs')."""
    if tools and tool_mode(req) in ("required", "function"):
        return forced_call(tools, model.template.tool_format, limits.max_schema_bytes, violations)
    return response_format


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
    return model.template.encode([_for_template(m) for m in messages], tools, add_generation_prompt)


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
    field = "max_completion_tokens" if req.HasField("max_completion_tokens") else "max_tokens"
    if not req.HasField(field):
        return room
    asked = getattr(req, field)
    if asked > room and not limits.clamp_max_tokens:
        violations.append(FieldViolation(
            field, f"the prompt ({len(prompt)} tokens) plus {field} ({asked}) exceeds the model's context length "
                   f"({context})"))
    return min(asked, room)


def _logit_bias(req: chat_pb2.ChatCompletionRequest, model: ServedModel,
                violations: list[FieldViolation]) -> tuple[tuple[int, float], ...]:
    vocab = len(model.engine.tokenizer)
    for token_id in sorted(req.logit_bias):
        if token_id >= vocab:
            violations.append(FieldViolation(f"logit_bias[{token_id}]", f"not a token id of {model.name}, whose "
                                                                        f"vocabulary has {vocab} tokens"))
    return tuple(sorted(req.logit_bias.items()))


def _sampling(req: chat_pb2.ChatCompletionRequest, max_tokens: int,
              logit_bias: tuple[tuple[int, float], ...]) -> SamplingParams:
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
        logit_bias=logit_bias,
        skip_special_tokens=bool(get("skip_special_tokens", True)),
    )


def request_violations(req: chat_pb2.ChatCompletionRequest, limits: ServerConfig) -> list[FieldViolation]:
    """What the request alone breaks, before any model is consulted: the operator's size limits (past them, only
    those: nothing else is worth the work), else the contract's ranges, the message rules and the rules between
    fields."""
    return _size_violations(list(req.messages), limits) or \
        _annotation_violations(req) + _message_violations(list(req.messages)) + _cross_field_violations(req)


def validate_chat(req: chat_pb2.ChatCompletionRequest, registry: ModelRegistry,
                  limits: ServerConfig) -> ValidChat:
    """Raises ServiceError naming every violation (INVALID_ARGUMENT), or NOT_FOUND for an unknown model."""
    too_large = _size_violations(list(req.messages), limits)
    if too_large:
        raise ServiceError.invalid(too_large)
    violations = request_violations(req, limits)
    req = _with_functions_as_tools(req)
    renderable = _renderable(violations)
    parameters = tool_parameters(req.tools, violations) if tool_mode(req) != "none" else [None] * len(req.tools)
    tools = callable_tools(req, parameters)
    response_format = _response_format(req, limits, violations)
    model = _served(registry, req.model, violations)
    violations += _refused_violations(req, model)
    logit_bias = _logit_bias(req, model, violations)
    guided = _guided(req, tools, model, response_format, limits, violations)
    prompt: list[int] = []
    max_tokens = 0
    if renderable:
        try:
            offered = offered_tools(req.tools, parameters) if tool_mode(req) != "none" else None
            prompt = render_prompt(model, req.messages, offered)
        except ChatTemplateError as e:
            violations.append(FieldViolation(e.field, str(e)))
        else:
            max_tokens = _max_tokens(req, model, prompt, limits, violations)
    if violations:
        raise ServiceError.invalid(violations)
    return ValidChat(model, prompt, _sampling(req, max_tokens, logit_bias), req.n if req.HasField("n") else 1, guided,
                     list(tools), bool(req.logprobs), req.stream_options.include_usage,
                     "max_completion_tokens" if req.HasField("max_completion_tokens") else "max_tokens")


def validate_tokenize(req: chat_pb2.TokenizeRequest, registry: ModelRegistry,
                      limits: ServerConfig) -> tuple[ServedModel, list[int]]:
    """The model and the token ids of the text, or of the conversation as the model's template renders it."""
    too_large = _size_violations(list(req.messages), limits)
    if req.HasField("text") and len(req.text) > limits.max_content_chars:
        too_large.append(FieldViolation("text", f"at most {limits.max_content_chars} characters, got "
                                                f"{len(req.text)}"))
    if too_large:
        raise ServiceError.invalid(too_large)
    violations = _annotation_violations(req)
    if req.HasField("text") == bool(req.messages):
        violations.append(FieldViolation("text", "exactly one of text and messages must be set"))
    if req.tools and not req.messages:
        violations.append(FieldViolation("tools", "only with messages: tools are rendered by the chat template"))
    violations += _message_violations(list(req.messages))
    renderable = _renderable(violations)
    offered = offered_tools(req.tools, tool_parameters(req.tools, violations))
    model = _served(registry, req.model, violations)
    tokens: list[int] = []
    if req.HasField("text") and not violations:
        add_special = req.add_special_tokens if req.HasField("add_special_tokens") else False
        tokens = model.engine.tokenizer.encode(req.text, add_special_tokens=add_special)
    elif req.messages and renderable:
        add_generation_prompt = req.add_generation_prompt if req.HasField("add_generation_prompt") else True
        try:
            tokens = render_prompt(model, req.messages, offered, add_generation_prompt)
        except ChatTemplateError as e:
            violations.append(FieldViolation(e.field, str(e)))
    if violations:
        raise ServiceError.invalid(violations)
    return model, tokens

