"""A request's choices for engines that stream token ids: new ids in, the interface's events out.

The gRPC workers (TensorRT-LLM, vLLM, SGLang) return token ids only, so text
is made here, with the same byte-exact incremental
detokenizer and stop-string hold-back as the reference engine: every engine
streams the same text for the same tokens. An end-of-turn token ends its
choice without text, and special tokens (an end-of-turn token under
ignore_eos included) add none unless the request asks for their text, as in
the reference engine.
"""

from __future__ import annotations

from service.backends.base import Event, Finished, FinishReason, GenerationRequest, TokenDelta, TokenLogprob, TopToken
from service.backends.detokenizer import IncrementalDetokenizer


class Choices:
    def __init__(self, request: GenerationRequest, table: list[bytes], eos_ids: set[int],
                 special: frozenset[int]) -> None:
        self._request = request
        self._table = table
        self._eos = set() if request.sampling.ignore_eos else eos_ids
        silent = special if request.sampling.skip_special_tokens else frozenset()
        self._dets = [IncrementalDetokenizer(table, request.sampling.stop, silent) for _ in range(request.n)]
        self._seen = [0] * request.n
        self._finished = [False] * request.n
        self.queue_time = 0.0

    @property
    def done(self) -> bool:
        return all(self._finished)

    def open(self, index: int) -> bool:
        return 0 <= index < len(self._finished) and not self._finished[index]

    def seen(self, index: int) -> int:
        """Tokens of the choice already turned into events."""
        return self._seen[index]

    def logprob(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        """A token's logprob entry, its text and bytes (and its top alternatives') from the vocabulary. The
        alternatives are the top_logprobs most likely of those given, whatever their order: vLLM's and
        TensorRT-LLM's lists hold the sampled token, which need not be one of the best."""
        def text(t: int) -> str:
            return self._table[t].decode("utf-8", errors="replace")
        best = sorted(top, key=lambda alt: -alt[1])[:self._request.sampling.top_logprobs]
        tops = tuple(TopToken(t, text(t), lp, self._table[t]) for t, lp in best)
        return TokenLogprob(token_id, text(token_id), logprob, self._table[token_id], tops)

    def advance(self, index: int, tokens: list[int], finish: FinishReason | None,
                logprobs: list[TokenLogprob] | None = None) -> list[Event]:
        """Events for the choice's new tokens; `finish` is the engine's own reason when it ended the choice. Tokens
        after an end-of-turn token or a stop string are dropped: the choice ends there."""
        det = self._dets[index]
        text, stopped, taken = [], False, 0
        for token_id in tokens:
            taken += 1
            if token_id in self._eos:
                stopped = True
                break
            piece, stopped = det.add(token_id)
            text.append(piece)
            if stopped:   # a stop string: the text ends before it
                break
        tokens = tokens[:taken]
        reason = FinishReason.STOP if stopped else finish
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            text.append(det.flush())
        self._seen[index] += len(tokens)
        events: list[Event] = []
        joined = "".join(text)
        if tokens or joined:
            events.append(TokenDelta(index, tokens, joined, logprobs[:taken] if logprobs is not None else None))
        if reason is not None:
            events.append(self._finish(index, reason))
        return events

    def finish_all(self, reason: FinishReason) -> list[Event]:
        return [self._finish(i, reason) for i, done in enumerate(self._finished) if not done]

    def _finish(self, index: int, reason: FinishReason) -> Finished:
        self._finished[index] = True
        return Finished(index, reason, self._seen[index], self.queue_time)
