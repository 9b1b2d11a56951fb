"""What the load generator sends, and when: prompts of a token length or from a JSONL file, and arrival times.

Every random choice is seeded, so two targets measured in one run receive the
same prompts with the same sampling seeds at the same offsets.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

Messages = list[dict[str, str]]
# Retokenizing decoded text can merge or split tokens; a few rounds converge on the target length.
_LENGTH_ROUNDS = 8


def load_tokenizer(path: Path) -> Tokenizer:
    """A Hugging Face tokenizer.json, or a checkpoint folder holding one."""
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))


def synthetic_prompt(tokenizer: Tokenizer, length: int, rng: random.Random) -> str:
    """Text of `length` tokens (without special tokens) made of random ordinary tokens, as vLLM's random dataset."""
    special = set(tokenizer.get_added_tokens_decoder())
    vocab = [i for i in range(tokenizer.get_vocab_size()) if i not in special]
    ids = [rng.choice(vocab) for _ in range(length)]
    text = tokenizer.decode(ids)
    for _ in range(_LENGTH_ROUNDS):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) == length:
            break
        ids = ids[:length] + [rng.choice(vocab) for _ in range(length - len(ids))]
        text = tokenizer.decode(ids)
    return text


def synthetic_conversations(tokenizer: Tokenizer, count: int, input_len: int, seed: int) -> list[Messages]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": synthetic_prompt(tokenizer, input_len, rng)}] for _ in range(count)]


def _conversation(row: dict[str, Any]) -> Messages:
    """OpenAI `messages`, or ShareGPT `conversations` ({"from": "human"|"gpt", "value": ...})."""
    if "messages" in row:
        turns = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    else:
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        turns = [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
    # The prompt is the conversation up to its last user turn; what followed it is the answer we ask for.
    last_user = max(i for i, t in enumerate(turns) if t["role"] == "user")
    return turns[: last_user + 1]


def jsonl_conversations(path: Path, count: int, seed: int) -> list[Messages]:
    """`count` conversations drawn from the file (in a seeded order, cycling when the file has fewer)."""
    with path.open(encoding="utf-8") as f:
        rows = [_conversation(json.loads(line)) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no conversations")
    random.Random(seed).shuffle(rows)
    return [rows[i % len(rows)] for i in range(count)]


def arrival_offsets(count: int, request_rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: a Poisson process at `request_rate`/s, or all at 0 when infinite."""
    if request_rate == float("inf"):
        return [0.0] * count
    rng = random.Random(seed)
    t, offsets = 0.0, []
    for _ in range(count):
        offsets.append(t)
        t += rng.expovariate(request_rate)
    return offsets
