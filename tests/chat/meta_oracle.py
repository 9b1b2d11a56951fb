"""Meta's reference Llama 3 code (the llama-models package): the oracle the Llama 3.1 tests hold llmserve to.

`Tokenizer` is Meta's tiktoken tokenizer over the real `tokenizer.model`;
`ChatFormat` is how Meta's own inference code turns messages into token ids
(headers with special tokens, content as text) and reads an answer's tool call.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from llama_models.datatypes import RawMessage, StopReason
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer

from service.repository.build.llama3_tokenizer import meta_tokenizer_model

BOS, EOT, EOM, END_OF_TEXT, PYTHON_TAG = 128000, 128009, 128008, 128001, 128010
END_OF_TURN = {END_OF_TEXT, EOM, EOT}


@cache
def tokenizer() -> Tokenizer:
    return Tokenizer(meta_tokenizer_model())


@cache
def chat_format() -> ChatFormat:
    return ChatFormat(tokenizer())


def encode(text: str) -> list[int]:
    """A rendered prompt's ids: every special token's text is the special token (allowed_special="all")."""
    return tokenizer().encode(text, bos=False, eos=False, allowed_special="all")


def encode_text(text: str) -> list[int]:
    """Plain text's ids: special-token text is text (Meta's default, as ChatFormat encodes message content)."""
    return tokenizer().encode(text, bos=False, eos=False)


_MESSAGE = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)(<\|eot_id\|>|<\|eom_id\|>)", re.S)


def messages_of(rendered: str) -> list[RawMessage]:
    """The messages of a rendered Llama 3 prompt, their text exactly as rendered, in Meta's types."""
    return [RawMessage(role="tool" if role == "ipython" else role, content=text,  # type: ignore[arg-type]
                       stop_reason=StopReason.end_of_message if end == "<|eom_id|>" else StopReason.end_of_turn)
            for role, text, end in _MESSAGE.findall(rendered)]


def reading(tokens: list[int]) -> tuple[str, list[tuple[str, Any]]] | str:
    """What Meta's ChatFormat.decode_assistant_message reads from an answer's tokens (the end of turn added, as
    the model writes it): its content and calls (name, arguments), or the error it raises."""
    try:
        message = chat_format().decode_assistant_message([*tokens, EOT], StopReason.end_of_turn)
    except Exception as e:  # what Meta's reader raises is part of the record
        return f"raises {type(e).__name__}"
    return message.content, [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in message.tool_calls]
