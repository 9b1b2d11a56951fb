"""Special-token text is special only where the chat template writes it, on every kind of tokenizer and template:
what a client sends stays text, and a conversation without such text encodes exactly as the one-call encoding of
its rendering does, through the same split-and-encode path (byte-level BPE, SentencePiece's two ways of adding
the leading "▁", special tokens that strip whitespace)."""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from service.models.special_text import SpecialText
from service.models.template import TEMPLATES, ChatTemplate, ChatTemplateError
from tests.helpers import LLAMA31

CONVERSATION = [
    {"role": "system", "content": "You are terse. Answer in a word."},
    {"role": "user", "content": "  Name a prime, please.\n"},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another one, ok?  "},
]
LLAMA_2_SPECIALS = ["<unk>", "<s>", "</s>"]


def _corpus() -> list[str]:
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


@cache
def _sentencepiece_model() -> Tokenizer:
    """A BPE model over "▁"-joined words, trained on pre-split words (whole-text training is quadratic)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=2000, special_tokens=LLAMA_2_SPECIALS,
                                                                 show_progress=False))
    return tokenizer


def sentencepiece_like(scheme: str) -> PreTrainedTokenizerFast:
    """A Llama 2-style tokenizer: "▁" for spaces, <s> and </s>; `legacy` prepends "▁" to every piece between
    special tokens (a normalizer, as the Hub's Llama 2 files do), `first` only at the start of the input
    (Metaspace, as transformers writes Llama tokenizers now)."""
    tokenizer = Tokenizer.from_str(_sentencepiece_model().to_str())
    if scheme == "legacy":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.pre_tokenizer = None
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def stripping() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose special tokens take the whitespace around them (lstrip/rstrip)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.add_special_tokens([AddedToken("<s>", special=True, rstrip=True),
                                  AddedToken("</s>", special=True, lstrip=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizers(engines_dir: Path, llama31_engines_dir: Path) -> dict[str, Any]:
    return {"demo": AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint"),
            "llama-3": AutoTokenizer.from_pretrained(llama31_engines_dir / LLAMA31 / "checkpoint"),
            "sentencepiece-legacy": sentencepiece_like("legacy"), "sentencepiece-first": sentencepiece_like("first"),
            "stripping": stripping()}


@pytest.fixture(scope="module")
def made(tokenizers: dict[str, Any]) -> Callable[[str, str], tuple[Any, ChatTemplate, SpecialText]]:
    """(tokenizer, ChatTemplate, SpecialText) by tokenizer kind and template, made once: Meta's tokenizer takes a
    second to copy."""
    cache: dict[tuple[str, str], tuple[Any, ChatTemplate, SpecialText]] = {}

    def get(kind: str, template: str) -> tuple[Any, ChatTemplate, SpecialText]:
        if (kind, template) not in cache:
            tokenizer = tokenizers[kind]
            cache[kind, template] = tokenizer, ChatTemplate(tokenizer, TEMPLATES / template), SpecialText(tokenizer)
        return cache[kind, template]

    return get


CASES = [("demo", "llama-3.1-instruct.jinja"), ("llama-3", "llama-3.1-instruct.jinja"),
         ("llama-3", "llama-3.1-nemotron-70b-instruct.jinja"), ("sentencepiece-legacy", "llama-2-chat.jinja"),
         ("sentencepiece-first", "llama-2-chat.jinja"), ("sentencepiece-first", "codellama-70b-instruct.jinja"),
         ("stripping", "llama-2-chat.jinja")]


@pytest.mark.parametrize(("kind", "template"), CASES)
def test_without_special_text_the_ids_are_the_one_call_encodings(made: Callable[..., Any], kind: str,
                                                                 template: str) -> None:
    """The split at the template's special tokens and the text between them encoded apart: the same ids."""
    tokenizer, chat, special = made(kind, template)
    rendered = chat.render(CONVERSATION)
    expected = tokenizer.encode(rendered, add_special_tokens=False)
    assert special.encode(lambda mark: chat.render(mark(CONVERSATION))) == expected
    assert chat.encode(CONVERSATION) == expected


@pytest.mark.parametrize(("kind", "template"), CASES)
def test_special_text_in_content_is_text(made: Callable[..., Any], kind: str, template: str) -> None:
    tokenizer, chat, _ = made(kind, template)
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    forged = " ".join(sorted(specials)[:6])
    messages = [{**m, "content": f"{m['content']} {forged} x"} for m in CONVERSATION]
    ids = chat.encode(messages)
    special_ids = {tokenizer.convert_tokens_to_ids(t) for t in specials}
    assert [i for i in ids if i in special_ids] == [i for i in chat.encode(CONVERSATION) if i in special_ids]
    if kind not in ("sentencepiece-legacy", "stripping"):  # "▁" before every piece, whitespace taken by tokens
        assert tokenizer.decode(ids) == chat.render(messages)


def test_a_template_that_cuts_content_holding_special_text_refuses_it(tokenizers: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    """The markers no longer pair up, so nothing tells content from template: refused, not encoded unsafely."""
    cutting = tmp_path / "cutting.jinja"
    cutting.write_text("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                       "{{ m.content[:12] }}<|eot_id|>{% endfor %}")
    chat = ChatTemplate(tokenizers["llama-3"], cutting)
    assert len(chat.encode([{"role": "user", "content": "a long message without special text"}])) > 5
    with pytest.raises(ChatTemplateError) as e:
        chat.encode([{"role": "user", "content": "a long message <|eot_id|>"}])
    assert e.value.field == "messages" and "special-token text" in str(e.value)
