"""Chat messages to a prompt, with the model's own chat template (or the manifest's override).

Templates are the models' documented prompt formats; rendering goes through
transformers' `apply_chat_template`, so a checkpoint's tokenizer_config.json
template is used exactly as its authors wrote it. A template that rejects a
conversation (Llama 2's "roles must alternate") becomes a ChatTemplateError a
client can read, never a traceback. Special-token text in what the client sent
stays text: only the template's own special tokens are special
(service/models/special_text.py).

Tools reach the prompt one of two ways, the model's `tool_format`:
"llama-3.1-json" when its template renders `tools` itself (Llama 3.1 and
Nemotron ask for `{"name": ..., "parameters": {...}}`), "hermes" when it does
not (rendering with and without a tool gives the same prompt): then llmserve
writes tools, past calls and results into the conversation itself
(service/models/hermes.py) rather than let them vanish.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import jinja2

from service.models import hermes
from service.models.special_text import MarkersLost, SpecialText

LLAMA_JSON, HERMES = "llama-3.1-json", "hermes"
_PROBE_MESSAGES = [{"role": "user", "content": "What time is it?"}]
_PROBE_TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "The current time",
                                                  "parameters": {"type": "object", "properties": {}}}}]
TEMPLATES = Path(__file__).resolve().parent / "templates"


class ChatTemplateError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sends tool-call arguments as JSON text; templates expect them as objects."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        function = dict(call.get("function", {}))
        with contextlib.suppress(json.JSONDecodeError):  # templates that print arguments verbatim take the text
            function["arguments"] = json.loads(function.get("arguments") or "{}")
        calls.append({**call, "function": function})
    return {**message, "tool_calls": calls}


class ChatTemplate:
    def __init__(self, tokenizer: Any, override: Path | None = None) -> None:
        self._tokenizer = tokenizer
        self._template = override.read_text() if override else getattr(tokenizer, "chat_template", None)
        if not self._template:
            raise ValueError("the model's tokenizer has no chat template; set chat_template in its manifest "
                             f"(templates for the target families are in {TEMPLATES})")
        self._special = SpecialText(tokenizer)
        self.tool_format = LLAMA_JSON if self._renders_tools() else HERMES

    def _renders_tools(self) -> bool:
        try:
            return self._apply(_PROBE_MESSAGES, _PROBE_TOOLS, True) != self._apply(_PROBE_MESSAGES, None, True)
        except ChatTemplateError:  # a template that fails on tools cannot render them
            return False

    def _apply(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               add_generation_prompt: bool) -> str:
        try:
            return self._tokenizer.apply_chat_template(messages, tools=tools, chat_template=self._template,
                                                       add_generation_prompt=add_generation_prompt, tokenize=False)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise ChatTemplateError("messages", f"the model's chat template rejected the conversation: {e}") from None

    def _prepared(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The conversation and tools as the template is handed them: with tools written in for "hermes"."""
        if self.tool_format == HERMES:
            return hermes.conversation(messages, tools), None
        return [_for_template(m) for m in messages], tools

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        return self._apply(*self._prepared(messages, tools), add_generation_prompt)

    def encode(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered prompt: special tokens where the template writes them, never in what the
        client sent. Templates write BOS themselves, so none is added here."""
        messages, tools = self._prepared(messages, tools)
        if not (self._special.found_in(messages) or self._special.found_in(tools)):
            return self._tokenizer.encode(self._apply(messages, tools, add_generation_prompt),
                                          add_special_tokens=False)
        try:
            return self._special.encode(lambda mark: self._apply(mark(messages), mark(tools), add_generation_prompt))
        except MarkersLost as e:
            raise ChatTemplateError("messages", f"a message holds special-token text and the model's chat template "
                                                f"does not render it whole ({e}), so it cannot be kept as text: "
                                                "remove it") from None
