"""Tools for models whose chat template cannot show them: llmserve writes them into the conversation itself.

Many chat templates (SmolLM2's ChatML, Llama 2's, CodeLlama's) know roles and
text only; handed `tools`, they render the same prompt as without, and a
tool-calling request would silently lose its tools. For those models the
conversation is rewritten, before their own template renders it, in the
Hermes format (NousResearch Hermes 2 Pro, Qwen 2.5), the most widely trained
convention for tools in plain text:

- the system turn ends with the tools, one JSON object a line inside
  `<tools></tools>`, and how to call them (inserted as a system message when
  the conversation has none);
- an assistant's past calls become its text, each
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- tool results become a user turn, each `<tool_response>\\n...\\n</tool_response>`
  (consecutive results share one turn).

The model answers a call the same way; service/chat/tools.py reads it back.
"""

from __future__ import annotations

import json
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
INSTRUCTIONS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def tools_text(tools: list[dict[str, Any]]) -> str:
    return INSTRUCTIONS.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def _arguments(text: str | None) -> Any:
    """OpenAI sends arguments as JSON text; written back as the object they encode (or as text, if they are not
    JSON: the model wrote them so)."""
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return text


def call_text(name: str, arguments: str | None) -> str:
    call = json.dumps({"name": name, "arguments": _arguments(arguments)}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def _assistant(message: dict[str, Any]) -> dict[str, Any]:
    calls = [call_text(c.get("function", {}).get("name", ""), c.get("function", {}).get("arguments"))
             for c in message["tool_calls"]]
    text = "\n".join([message["content"], *calls] if message.get("content") else calls)
    return {"role": "assistant", "content": text}


def conversation(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The messages as a template that knows only roles and text can render them, tools included."""
    out: list[dict[str, Any]] = []
    after_tool = False
    for message in messages:
        role = message.get("role")
        if role == "tool":
            response = f"<tool_response>\n{message.get('content', '')}\n</tool_response>"
            if after_tool:
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + response}
            else:
                out.append({"role": "user", "content": response})
        elif message.get("tool_calls"):
            out.append(_assistant(message))
        else:
            out.append(message)
        after_tool = role == "tool"
    if tools:
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content', '')}\n\n{tools_text(tools)}"}
        else:
            out.insert(0, {"role": "system", "content": tools_text(tools)})
    return out
