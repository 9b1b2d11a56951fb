"""Closing an output within its budget (service/backends/closing), checked against xgrammar itself.

From any point of a random walk through xgrammar's own mask, the tracker's closing must be text the matcher
accepts and that completes the output; the processor built on it must end every output validly within any budget
from the shortest output's up, and leave the output alone where the budget suffices.
"""

from __future__ import annotations

import json
import random
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

from service.backends.base import GuidedDecoding
from service.backends.closing import tracker
from service.backends.closing.numbers import Range, completion
from service.backends.closing.schema import json_shape
from service.backends.grammar import closing_shape, json_document
from service.backends.reference.guided import Guides
from service.backends.vocab import token_byte_table

SCHEMAS: dict[str, dict[str, Any]] = {
    "object": {"type": "object"},
    "nested": {"type": "object", "required": ["name", "age", "address", "tags"], "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "address": {"type": "object", "required": ["city", "zip"], "properties": {
            "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
        "tags": {"type": "array", "minItems": 2, "items": {"enum": ["a", "bb", "ccc"]}}}},
    "optional_and_extra": {"type": "object", "required": ["d"], "additionalProperties": {"type": "integer"},
                           "properties": {"a": {"type": "string", "minLength": 3},
                                          "b": {"type": "array", "items": {"type": "string", "maxLength": 4}},
                                          "c": {"type": "number"}, "d": {"type": "integer", "exclusiveMinimum": 1000}}},
    "numbers_and_unions": {"type": "object", "required": ["p", "q", "r"], "properties": {
        "p": {"type": "number", "exclusiveMinimum": 0.5, "maximum": 2},
        "q": {"anyOf": [{"type": "number", "minimum": -5, "maximum": -2}, {"type": "null"}]},
        "r": {"type": ["string", "boolean"], "maxLength": 6}}},
    "tool_call": {"anyOf": [
        {"type": "object", "additionalProperties": False, "required": ["name", "parameters"], "properties": {
            "name": {"const": "get_weather"}, "parameters": {"type": "object", "required": ["city", "unit"],
                                                            "properties": {"city": {"type": "string"},
                                                                           "unit": {"enum": ["c", "f"]}}}}},
        {"type": "object", "additionalProperties": False, "required": ["name", "parameters"], "properties": {
            "name": {"const": "ping"}, "parameters": {"type": "object", "properties": {}}}}]},
    "recursive": {"type": "object", "required": ["v"], "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}}},
    "prefix_items": {"type": "array", "minItems": 3, "items": {"type": "null"},
                     "prefixItems": [{"type": "string", "pattern": "[a-c]+x?"}, {"type": "number"}]},
}
REGEXES = [r"[a-z]{2,5}@[a-z]+\.(com|org)", r"(ab|c)*d{2}", r"\d+(\.\d{1,2})?"]
CHOICES = [("yes", "no", "maybe"), ("a", "ab", "abc")]


@pytest.fixture(scope="module")
def guides(engines_dir: Path) -> Guides:
    tokenizer = AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint")
    return Guides(tokenizer, len(tokenizer), {tokenizer.eos_token_id}, token_byte_table(tokenizer),
                  torch.device("cpu"))


def constraints() -> list[tuple[str, GuidedDecoding]]:
    hermes = GuidedDecoding(json_schema=json.dumps(SCHEMAS["tool_call"]), tags=("<tool_call>", "</tool_call>"))
    return [(name, GuidedDecoding(json_schema=json.dumps(s))) for name, s in SCHEMAS.items()] + \
        [("hermes tool_call", hermes)] + \
        [(f"regex {r}", GuidedDecoding(regex=r)) for r in REGEXES] + \
        [(f"choice {c}", GuidedDecoding(choice=c)) for c in CHOICES]


def allowed_tokens(guides: Guides, matcher: xgr.GrammarMatcher, json_grammar: bool) -> list[int]:
    mask = xgr.allocate_token_bitmask(1, guides.vocab_size)
    matcher.fill_next_token_bitmask(mask)
    logits = torch.zeros(guides.vocab_size)
    xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), mask, vocab_size=guides.vocab_size)
    return [t for t in torch.isfinite(logits).nonzero().flatten().tolist()
            if t not in guides.stop_ids and not (json_grammar and any(b < 0x20 for b in guides.token_bytes[t]))]


@pytest.mark.parametrize(("name", "guided"), constraints(), ids=[n for n, _ in constraints()])
def test_the_closing_completes_the_output_from_anywhere(guides: Guides, name: str, guided: GuidedDecoding) -> None:
    """Random walks through xgrammar's own mask; at every step the closing must be accepted and complete."""
    grammar = guides.grammars.get(guided)
    assert grammar.shape is not None and grammar.shortest, "modelled, and its shortest output verified"
    rng = random.Random(name)
    checked = 0
    for _ in range(12):
        matcher = xgr.GrammarMatcher(grammar.compiled)
        state, text = tracker.start(grammar.shape), b""
        for _ in range(rng.randint(1, 60)):
            closing = tracker.closing(state)
            assert len(closing) == tracker.closing_len(state), text
            probe = matcher.fork()
            assert probe.accept_string(closing) and probe.is_completed(), (text, closing)
            spelled = guides.speller.spell(closing)
            assert spelled is not None and len(spelled) <= len(closing)
            checked += 1
            options = allowed_tokens(guides, matcher, json_document(guided))
            if not options:
                break
            token = rng.choice(options)
            assert matcher.accept_token(token)
            text += guides.token_bytes[token]
            state = tracker.advance(state, guides.token_bytes[token])  # type: ignore[assignment]
            assert state is not None, f"the tracker lost {text!r}"
    assert checked >= 24


def run_choice(guides: Guides, guided: GuidedDecoding, budget: int, seed: int) -> tuple[bytes, str, int]:
    """One choice sampled at temperature 1 from random logits, as the engine runs it: (text, why it ended, tokens)."""
    processor = guides.processor(guided, guides.grammars.get(guided), budget)
    generator = torch.Generator().manual_seed(seed)
    text, tokens = b"", 0
    while tokens < budget:
        logits = torch.randn(guides.vocab_size, generator=generator) * 3
        processor.apply(logits)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        token = processor.review(token)
        tokens += 1
        if token in guides.stop_ids:
            return text, "length" if processor.closed_by_budget else "stop", tokens
        text += guides.token_bytes[token]
        if processor.accept(token):
            return text, "length" if processor.closed_by_budget else "stop", tokens
    return text, "length", tokens


def assert_valid(guided: GuidedDecoding, text: bytes) -> None:
    if guided.tags is not None:
        before, after = (t.encode() for t in guided.tags)
        assert text.startswith(before) and text.endswith(after), text
        text = text[len(before):-len(after)]
    if guided.json_schema is not None:
        jsonschema.validate(json.loads(text), json.loads(guided.json_schema))
    elif guided.regex is not None:
        assert re.fullmatch(guided.regex, text.decode()), text
    else:
        assert text.decode() in (guided.choice or ()), text


@pytest.mark.parametrize(("name", "guided"), constraints(), ids=[n for n, _ in constraints()])
def test_every_budget_from_the_shortest_output_up_ends_valid(guides: Guides, name: str,
                                                             guided: GuidedDecoding) -> None:
    grammar = guides.grammars.get(guided)
    shortest = len(grammar.shortest)
    closed = 0
    for budget in sorted({shortest, shortest + 1, shortest + 3, shortest + 10, 40, 90}):
        for seed in range(6):
            text, reason, tokens = run_choice(guides, guided, budget, seed)
            assert tokens <= budget
            assert_valid(guided, text)
            closed += reason == "length"
    assert closed, "some budgets must have been too small for the model's own output"


def test_a_budget_that_suffices_changes_nothing(guides: Guides) -> None:
    """The same seed with exactly enough budget for the model's own output, or more, gives the same output."""
    guided = GuidedDecoding(json_schema=json.dumps(SCHEMAS["nested"]))
    guides.grammars.get(guided)
    compared = 0
    for seed in range(8):
        own, reason, tokens = run_choice(guides, guided, 400, seed)
        if reason != "stop":
            continue
        for budget in (tokens, tokens + 5):
            assert run_choice(guides, guided, budget, seed)[:2] == (own, "stop")
        shorter = run_choice(guides, guided, max(len(guides.grammars.get(guided).shortest), tokens - 8), seed)[0]
        common = next((i for i, (a, b) in enumerate(zip(own, shorter, strict=False)) if a != b), len(shorter))
        assert common > 0 and shorter[:common] == own[:common], "the model's own text up to where closing began"
        compared += 1
    assert compared >= 3


@pytest.mark.parametrize(("text", "range_", "expected"), [
    ("", Range(True), "0"), ("-", Range(True), "1"), ("-", Range(False), "0"), ("1.", Range(False), "0"),
    ("2e-", Range(False), "0"), ("12", Range(False), ""),
    ("", Range(True, Decimal(100000), True), "100001"), ("1", Range(True, Decimal(100000), True), "00001"),
    ("0", Range(False, Decimal("0.5"), True, Decimal(100)), ".6"),
    ("", Range(True, Decimal(-5), False, Decimal(-2)), "-2"),
    ("", Range(False, Decimal("0.25"), False, Decimal("0.26")), "0.25"),
    ("13", Range(True, Decimal(0), False, Decimal(130)), ""),
])
def test_numbers_close_with_the_fewest_characters_in_range(text: str, range_: Range, expected: str) -> None:
    assert completion(text, range_) == expected


def test_unmodelled_constraints_are_served_without_closing(guides: Guides) -> None:
    for guided in (GuidedDecoding(json_schema=json.dumps({"type": "string", "format": "date"})),
                   GuidedDecoding(ebnf='root ::= "a"+')):
        grammar = guides.grammars.get(guided)
        assert grammar.shape is None and not grammar.shortest
    assert closing_shape(GuidedDecoding(json_object=True)) is not None
    assert json_shape({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}).shortest == \
        b'{"a": 0}'
