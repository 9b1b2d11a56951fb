"""Constrained decoding in the reference engine: an xgrammar matcher per choice, as a logits processor.

The sampler calls `apply` on the choice's logits row before anything else
(penalties, temperature, filters only ever see allowed tokens); the engine
calls `accept` with the token sampled. The grammar allows the end-of-sequence
token only where the output may end, so a constrained choice is always
complete unless max_tokens or a stop string cut it short.

Whenever the grammar is a JSON schema, the tokens that would put a raw
control character into it are masked too (service.backends.grammar.json_banned_tokens).
"""

from __future__ import annotations

import torch
import xgrammar as xgr

from service.backends.base import GuidedDecoding
from service.backends.grammar import GrammarCache, json_banned_tokens, schema_text


class GrammarProcessor:
    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, banned: torch.Tensor | None) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._mask = xgr.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size
        self._banned = banned

    def apply(self, logits: torch.Tensor) -> None:
        self._matcher.fill_next_token_bitmask(self._mask)
        xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), self._mask.to(logits.device), vocab_size=self._vocab_size)
        if self._banned is not None:
            logits[:self._vocab_size].masked_fill_(self._banned, float("-inf"))

    def accept(self, token: int) -> bool:
        """True once the grammar is complete and nothing may follow."""
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}, which its own mask allowed")
        return self._matcher.is_terminated()


class Guides:
    """The engine's grammars: compiled once per schema (see service.backends.grammar), one matcher per choice."""

    def __init__(self, tokenizer: object, vocab_size: int, stop_token_ids: set[int], token_bytes: list[bytes],
                 device: torch.device) -> None:
        self.grammars = GrammarCache(tokenizer, vocab_size, stop_token_ids)
        self._vocab_size = vocab_size
        self._control = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self._control[json_banned_tokens(token_bytes[:vocab_size])] = True

    def check(self, guided: GuidedDecoding) -> None:
        """Compiles now (cached), so that a grammar xgrammar refuses is an InvalidRequest before admission
        and the engine thread finds it compiled."""
        self.grammars.get(guided)

    def processor(self, guided: GuidedDecoding) -> GrammarProcessor:
        banned = self._control if schema_text(guided) is not None else None
        return GrammarProcessor(self.grammars.get(guided), self._vocab_size, banned)
