"""Meta's Llama 3 tokenizer (tiktoken BPE) as a Hugging Face fast tokenizer, converted offline in seconds.

Llama 3.1 and its Nemotron fine-tune use the Llama 3 tokenizer, which Meta
ships as `tokenizer.model` in its `llama-models` package: one line per token,
its bytes in base64 and its rank (its id). tiktoken encodes a piece of text by
splitting it with Meta's regex, then repeatedly merging the adjacent pair whose
concatenation has the lowest rank. A `tokenizers` BPE model does the same when

- the vocabulary is the ranks, each token's bytes written in GPT-2's
  byte-to-unicode alphabet (byte-level BPE);
- the merges are every split (left, right) of every token into two tokens,
  ordered by the rank of the token they make (ties: the ranks of the parts),
  the order in which tiktoken would apply them;
- `ignore_merges` is set: a piece that is a token as a whole is that token
  (tiktoken looks a piece up before merging);
- the pre-tokenizer is Meta's regex (`Split`, isolated), then `ByteLevel`
  without a regex of its own.

This is transformers' `TikTokenConverter` algorithm, written out so that the
conversion needs neither tiktoken nor a private transformers API. The 256
special tokens follow the 128,000 BPE tokens at Meta's ids, in Meta's order
(`llama_models/llama3/tokenizer.py`), as added special tokens: `encode`
recognises their text (Meta's `allowed_special="all"`);
`split_special_tokens=True` reads it as text (Meta's default). Encoding with
`add_special_tokens=True` prepends <|begin_of_text|>, as Meta's `bos=True` and
the Hub's Llama 3 checkpoints do; chat templates write BOS themselves.

tests/chat/test_llama3_tokenizer.py checks the result against Meta's own
Tokenizer, token for token.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# Meta's Tokenizer.pat_str (llama-models 0.3.0, llama3/tokenizer.py), verbatim.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
NUM_BASE_TOKENS = 128_000
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",  # 128000
    "<|end_of_text|>",  # 128001
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",  # 128006
    "<|end_header_id|>",
    "<|eom_id|>",  # 128008
    "<|eot_id|>",  # 128009
    "<|python_tag|>",  # 128010
    "<|image|>",
]
SPECIAL_TOKENS: list[str] = _NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))]
SPECIAL_TOKEN_IDS: dict[str, int] = {token: NUM_BASE_TOKENS + i for i, token in enumerate(SPECIAL_TOKENS)}
VOCAB_SIZE = NUM_BASE_TOKENS + NUM_SPECIAL_TOKENS
BOS = "<|begin_of_text|>"
# What ends an Instruct model's turn: the Hub checkpoints' generation_config.json lists these three.
END_OF_TURN = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def meta_tokenizer_model() -> Path:
    """`llama3/tokenizer.model` of the installed `llama-models` package, found without importing it."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Meta's Llama 3 tokenizer comes from the llama-models package, which is not "
                                "installed: `make install` (a dev dependency) or `pip install llama-models`")
    for location in spec.submodule_search_locations:
        path = Path(location) / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    raise FileNotFoundError("llama_models/llama3/tokenizer.model is missing from the installed llama-models")


def load_ranks(model_file: Path) -> dict[bytes, int]:
    """The BPE ranks of a tiktoken file (`<base64 token> <rank>` per line); they must be 0..n-1, each once."""
    ranks: dict[bytes, int] = {}
    for line in model_file.read_text(encoding="ascii").splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{model_file}: the ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def _byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode: byte b is written as the character at index b."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet, extra = [""] * 256, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return alphabet


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level vocabulary, and the merges that reproduce tiktoken's rank-ordered merging."""
    alphabet = _byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    splits: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                splits.append((rank, left_rank, right_rank, left, right))
    splits.sort()
    return {text(token): rank for token, rank in ranks.items()}, [(text(a), text(b)) for *_, a, b in splits]


def build_tokenizer(model_file: Path | None = None) -> Tokenizer:
    """The fast tokenizer for Meta's `tokenizer.model` (default: the installed llama-models' own)."""
    ranks = load_ranks(model_file or meta_tokenizer_model())
    if len(ranks) != NUM_BASE_TOKENS:
        raise ValueError(f"expected the {NUM_BASE_TOKENS} BPE tokens of Llama 3, found {len(ranks)}")
    vocab, merges = vocab_and_merges(ranks)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        if tokenizer.token_to_id(token) != token_id:
            raise AssertionError(f"{token} got id {tokenizer.token_to_id(token)}, Meta's is {token_id}")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, SPECIAL_TOKEN_IDS[BOS])]),
    ])
    return tokenizer
