"""Constrained decoding in the reference engine: an xgrammar matcher per choice, as a logits processor, that
also closes the output before max_tokens runs out.

The sampler calls `apply` on the choice's logits row before anything else
(penalties, temperature, filters only ever see allowed tokens), then `review`
with the token it picked, and the engine calls `accept` with the token kept.
The grammar allows the end-of-sequence token only where the output may end.

Closing within the budget: a tracker (service/backends/closing) follows the
output and knows the shortest text that ends it validly. `review` keeps the
model's token whenever what would be left of the budget after it still fits
that ending (a byte count settles it almost always; near the end the ending
is counted in tokens, each enclosing level's part spelled once). Otherwise it
steers: the ending from before the token, spelled in the fewest tokens, is
forced token by token, each checked against the matcher's mask first, and the
choice ends with `length` when it is written. So the model writes everything
it can, and the answer parses.

Whenever the output is a JSON document (between a tool call's tags, maybe),
the tokens that would put a raw control character into it are masked too:
the one rule every engine follows (service.backends.grammar.json_banned_tokens).
"""

from __future__ import annotations

import logging

import torch
import xgrammar as xgr

from service.backends.base import GuidedDecoding, InvalidRequest
from service.backends.closing import tracker
from service.backends.grammar import Grammar, GrammarCache, json_banned_tokens, json_document

log = logging.getLogger("llmserve.engine.reference")


class GrammarProcessor:
    def __init__(self, grammar: Grammar, budget: int, guides: Guides, banned: torch.Tensor | None) -> None:
        self._matcher = xgr.GrammarMatcher(grammar.compiled)
        self._mask = xgr.allocate_token_bitmask(1, guides.vocab_size)
        self._guides = guides
        self._banned = banned
        self._left = budget                                   # tokens this choice may still produce
        self._state = tracker.start(grammar.shape) if grammar.shape is not None else None
        self._following: tracker.State | None = None          # the state after the token under review
        self._plan: list[int] | None = None                   # steering: the closing tokens still to force
        self._spelled_levels: dict[int, tuple[object, float]] = {}  # id(frame) -> (frame, tokens of its closing)
        self._token_under_review = -1
        self.closed_by_budget = False

    def apply(self, logits: torch.Tensor) -> None:
        self._matcher.fill_next_token_bitmask(self._mask)
        if self._plan is not None and self._allowed(self._plan[0]):
            forced = self._plan[0]
            kept = logits[forced].clone()
            logits.fill_(float("-inf"))
            logits[forced] = kept
            return
        if self._plan is not None:  # the matcher refuses the closing: fall back to plain guided decoding
            log.warning("xgrammar refused a token of the closing worked out for the output; it continues "
                        "without closing")
            self._plan, self._state = None, None
        vocab = self._guides.vocab_size
        xgr.apply_token_bitmask_inplace(logits.unsqueeze(0), self._mask.to(logits.device), vocab_size=vocab)
        if self._banned is not None:
            logits[:vocab].masked_fill_(self._banned, float("-inf"))

    def review(self, token: int) -> int:
        """The token to emit: `token`, unless after it the budget left could not close the output."""
        if self._plan is not None:
            return self._plan[0]
        state, self._token_under_review = self._state, token
        if state is None or token in self._guides.stop_ids:
            return token
        following = tracker.advance(state, self._guides.token_bytes[token])
        if following is None:
            return self._lost("the closing tracker lost the output")
        self._following = following
        room = self._left - 1
        if tracker.closing_len(following) <= room or self._closing_tokens(following) <= room:
            return token
        plan = self._guides.speller.spell(tracker.closing(state)) or sorted(self._guides.stop_ids)[:1]
        if not self._allowed(plan[0]):
            return self._lost("xgrammar refused the closing worked out for the output")
        self._plan, self.closed_by_budget = plan, True
        return plan[0]

    def _lost(self, why: str) -> int:
        """Gives up closing this choice (a case the tracker does not model): it goes on as plain guided decoding."""
        log.warning(f"{why}; it continues without closing")
        self._state = None
        return self._token_under_review

    def _closing_tokens(self, state: tracker.State) -> float:
        """An upper bound on the tokens that close the output: the open value's ending spelled now, each
        enclosing level's spelled once (a level's part does not change while a value inside it is written)."""
        top = tracker.cheapest(state)
        total = self._spelled(top.frame.closing())
        below = top.below
        while below is not None:
            cached = self._spelled_levels.get(id(below.frame))
            if cached is None or cached[0] is not below.frame:
                if len(self._spelled_levels) > 256:
                    self._spelled_levels.clear()
                cached = self._spelled_levels[id(below.frame)] = (below.frame, self._spelled(below.frame.closing()))
            total += cached[1]
            below = below.below
        return total

    def _spelled(self, text: bytes) -> float:
        tokens = self._guides.speller.spell(text)
        return float("inf") if tokens is None else len(tokens)

    def _allowed(self, token: int) -> bool:
        """Whether this step's mask (filled by apply) allows the token."""
        return bool((int(self._mask[0, token >> 5]) >> (token & 31)) & 1)

    def accept(self, token: int) -> bool:
        """True once the output is complete and must end: the grammar terminated, or a forced closing is written."""
        if not self._matcher.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}, which its own mask allowed")
        self._left -= 1
        if self._plan is not None:
            self._plan.pop(0)
            return not self._plan or self._matcher.is_terminated()
        if self._state is not None:
            self._state = self._following
        return self._matcher.is_terminated()


class Guides:
    """The engine's grammars (compiled once per constraint, see service.backends.grammar), one processor per choice."""

    def __init__(self, tokenizer: object, vocab_size: int, stop_token_ids: set[int], token_bytes: list[bytes],
                 device: torch.device) -> None:
        self.grammars = GrammarCache(tokenizer, vocab_size, stop_token_ids, token_bytes)
        self.speller = self.grammars.speller
        self.vocab_size = vocab_size
        self.stop_ids = frozenset(stop_token_ids)
        self.token_bytes = token_bytes
        self._control = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self._control[json_banned_tokens(token_bytes[:vocab_size])] = True

    def fits(self, guided: GuidedDecoding, grammar: Grammar, max_tokens: int) -> None:
        """Refuses a budget too small for the shortest valid output."""
        if grammar.shape is not None and max_tokens < len(grammar.shortest):
            shortest = (grammar.shape.shortest or b"").decode(errors="replace")
            preview = shortest if len(shortest) <= 80 else shortest[:77] + "..."
            raise InvalidRequest("max_tokens", f"{max_tokens} is too few for the shortest output {guided.field} "
                                               f"allows, {len(grammar.shortest)} tokens: {preview}")

    def processor(self, guided: GuidedDecoding, grammar: Grammar, budget: int) -> GrammarProcessor:
        banned = self._control if json_document(guided) else None
        return GrammarProcessor(grammar, budget, self, banned)
