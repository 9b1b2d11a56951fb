"""What every backend needs to know of a model's vocabulary: each token's exact bytes, and which tokens end a turn.

Bytes: byte-level BPE's GPT-2 alphabet, SentencePiece's <0xNN> byte fallback
and '▁'; special tokens stand for their text (logprobs show it), and are
listed apart so that their text reaches the output only when a request asks
(skip_special_tokens false). End of turn: the checkpoint's
generation_config.json and config.json `eos_token_id` (an id or a list:
Llama 3.1 has three) and the tokenizer's own EOS.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_byte_decoder() -> dict[str, int]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special tokens (<|eot_id|>, <|python_tag|>, </s>...): control, not text."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return frozenset(special | added)


def token_byte_table(tokenizer: Any) -> list[bytes]:
    """The bytes each token id stands for; special tokens stand for their text."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = "ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder)
    gpt2 = _gpt2_byte_decoder()
    special = special_token_ids(tokenizer)
    table = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        token = token or ""
        if i in special:
            table.append(token.encode())
        elif byte_level and all(ch in gpt2 for ch in token):
            table.append(bytes(gpt2[ch] for ch in token))
        elif match := _BYTE_FALLBACK.match(token):
            table.append(bytes([int(match.group(1), 16)]))
        else:
            table.append(token.replace("▁", " ").encode())
    return table


def eos_token_ids(checkpoint: Path, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = checkpoint / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids |= {v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
