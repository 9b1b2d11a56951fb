"""Chat messages to a prompt, with the model's own chat template (or the manifest's override).

Templates are the models' documented prompt formats; rendering goes through
transformers' `apply_chat_template`, so a checkpoint's tokenizer_config.json
template is used exactly as its authors wrote it. A template that rejects a
conversation (Llama 2's "roles must alternate") becomes a ChatTemplateError a
client can read, never a traceback. Special-token text in what the client sent
stays text: only the template's own special tokens are special
(service/models/special_text.py).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import jinja2

from service.models.special_text import MarkersLost, SpecialText

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

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        return self._render([_for_template(m) for m in messages], tools, add_generation_prompt)

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool) -> str:
        try:
            return self._tokenizer.apply_chat_template(messages, tools=tools, chat_template=self._template,
                                                       add_generation_prompt=add_generation_prompt, tokenize=False)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            raise ChatTemplateError("messages", f"the model's chat template rejected the conversation: {e}") from None

    def encode(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered prompt: special tokens where the template writes them, never in what the
        client sent. Templates write BOS themselves, so none is added here."""
        messages = [_for_template(m) for m in messages]
        if not (self._special.found_in(messages) or self._special.found_in(tools)):
            return self._tokenizer.encode(self._render(messages, tools, add_generation_prompt),
                                          add_special_tokens=False)
        try:
            return self._special.encode(lambda mark: self._render(mark(messages), mark(tools), add_generation_prompt))
        except MarkersLost as e:
            raise ChatTemplateError("messages", f"a message holds special-token text and the model's chat template "
                                                f"does not render it whole ({e}), so it cannot be kept as text: "
                                                "remove it") from None
