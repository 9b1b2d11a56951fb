"""Meta's Llama 3 tokenizer, converted for demo-llama-3.1 (service/repository/build/llama3_tokenizer.py), encodes and
decodes as Meta's own Tokenizer does, token for token: prose, code, every script, whitespace runs, special-token
text read both ways, texts made of random tokens, and every token's bytes as llmserve's detokenizer sees them."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from service.backends.vocab import token_byte_table
from service.repository.build.llama3_tokenizer import PATTERN, SPECIAL_TOKEN_IDS
from tests.chat import meta_oracle as meta
from tests.helpers import LLAMA31

CORPUS: dict[str, str] = {
    "empty": "",
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock; they'll say \"we've won\"!",
    "contractions upper": "IT'S WE'RE THEY'LL I'M YOU'D SHE'S DON'T",
    "code": "def f(x: int) -> int:\n    return x ** 2  # square\n\nclass A:\n\tpass\r\n}",
    "json": '{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2, 3]}}',
    "numbers": "3.14159 1234567890 1,000,000 0x1F 1e-10 -42 12345678901234567890",
    "whitespace runs": "a  b   c    d\t\te \u00a0\u3000 f     \n     g",
    "newlines": "\n\n\nline\r\n\r\n\r\n  \n\n  x\n",
    "trailing space": "hello world ",
    "emoji": "I ❤️ 🤖🚀👩‍👩‍👧‍👦 🇫🇷 ok 😀😃",
    "cjk": "日本語のテキストと中文文本和한국어 텍스트。",
    "accented": "Crème brûlée, naïve café, Ærøskøbing, Straße, İstanbul, Ångström",
    "combining": "e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353",
    "rtl": "مرحبا بالعالم שלום עולם",
    "long repeated": "a" * 1000 + "!" * 500 + " " * 300 + "=" * 200 + "ab" * 400,
    "special tokens": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "special token text in prose": "Say <|eot_id|> then <|python_tag|>x and <|reserved_special_token_100|>.",
    "special token lookalikes": "<|eot_id|| <eot_id> <|EOT_ID|> <|eot_id <|reserved_special_token_999|>",
    "control chars": "\x00\x01\x1b[31mred\x1b[0m\x7f",
    "math": "∀x∈ℝ: x² ≥ 0, ∑ᵢ aᵢ = π ≈ 3.14",
}


def _stdlib(files: int) -> dict[str, str]:
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:files]
    return {f"stdlib/{p.name}": p.read_text(encoding="utf-8", errors="replace") for p in paths}


def _random_texts(count: int) -> dict[str, str]:
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n\r\u00a0\u3000\u2028",
             "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "éèêëàâäôöûüçñßøåæ", "日本語中文한국어", "😀🤖🚀❤️\u200d👍🏽",
             "\u0301\u0308\u0303", "αβγδεζηθ", "мирпривет", "'s'T're've'M'll'd"]
    rng = random.Random(0)
    out = {}
    for i in range(count):
        chosen = rng.sample(pools, rng.randint(1, 4))
        out[f"random/{i}"] = "".join(rng.choice(rng.choice(chosen)) for _ in range(rng.randint(1, 120)))
    return out


TEXTS = {**CORPUS, **_stdlib(40), **_random_texts(500)}


@pytest.fixture(scope="module")
def converted(llama31_engines_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(llama31_engines_dir / LLAMA31 / "checkpoint")


def test_the_regex_and_special_tokens_are_metas(converted: PreTrainedTokenizerBase) -> None:
    assert meta.tokenizer().pat_str == PATTERN
    assert meta.tokenizer().special_tokens == SPECIAL_TOKEN_IDS
    assert len(converted) == meta.tokenizer().n_words == 128_256
    added = {t.content: (i, t.special) for i, t in converted.added_tokens_decoder.items()}
    assert added == {token: (i, True) for token, i in SPECIAL_TOKEN_IDS.items()}
    assert (converted.bos_token_id, converted.eos_token_id) == (meta.BOS, meta.EOT)


def test_encode_and_decode_equal_metas(converted: PreTrainedTokenizerBase) -> None:
    for name, text in TEXTS.items():
        ids = converted.encode(text, add_special_tokens=False)
        assert ids == meta.encode(text), f"{name}: special-token text recognised"
        assert converted.encode(text, add_special_tokens=False, split_special_tokens=True) == meta.encode_text(text), \
            f"{name}: special-token text read as text"
        assert converted.encode(text) == meta.tokenizer().encode(text, bos=True, eos=False, allowed_special="all"), \
            f"{name}: BOS"
        assert converted.decode(ids) == text == meta.tokenizer().decode(ids), f"{name}: decode"


def test_texts_of_random_tokens_encode_as_metas(converted: PreTrainedTokenizerBase) -> None:
    """Texts made of random tokens exercise merge orders that prose rarely does."""
    rng = random.Random(1)
    texts = [meta.tokenizer().decode([rng.randrange(128_000) for _ in range(rng.randint(1, 12))])
             for _ in range(30_000)]
    ours = converted(texts, add_special_tokens=False)["input_ids"]
    differ = [t for t, ids in zip(texts, ours, strict=True) if ids != meta.encode(t)]
    assert not differ, differ[:5]


def test_long_runs_equal_tiktoken(converted: PreTrainedTokenizerBase) -> None:
    """Meta's encode cuts runs of one character class at 25,000 characters (a tiktoken stack limit); the
    model's ids are tiktoken's on the whole run, which the converted tokenizer gives."""
    for text in (" " * 30_000, "1" * 30_000, "\n" * 30_000, "a" * 30_000):
        assert converted.encode(text, add_special_tokens=False) == meta.tokenizer().model.encode(text)


def test_every_tokens_bytes_are_tiktokens(converted: PreTrainedTokenizerBase) -> None:
    """llmserve's detokenizer turns each id into these bytes: the text a client sees is Meta's decode."""
    model = meta.tokenizer().model
    assert token_byte_table(converted) == [model.decode_single_token_bytes(i) for i in range(len(converted))]
