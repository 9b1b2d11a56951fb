"""Per-row sampling for a whole batch in one pass.

Each row has its own parameters. The common cases cost one softmax and one
cumulative sum for the batch: filters (top-k, top-p, min-p) sort only when some
row asks for one, penalties run only on the rows that set them. Randomness is
one uniform draw per row from the sequence's own generator, turned into a
token by inverse CDF, so a seeded request samples the same tokens whatever
else shares its batch.
"""

from __future__ import annotations

import torch

from service.backends.base import TokenLogprob, TopToken
from service.backends.reference.sequence import Sequence


def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """OpenAI's logit_bias: added to the row's logits, after a grammar's mask (-inf stays -inf, so a bias cannot
    undo what constrained decoding forbids) and before penalties, temperature and filters."""
    for i, s in enumerate(seqs):
        if s.params.logit_bias:
            ids = torch.tensor([t for t, _ in s.params.logit_bias], device=logits.device)
            bias = torch.tensor([b for _, b in s.params.logit_bias], dtype=logits.dtype, device=logits.device)
            logits[i].index_add_(0, ids, bias)


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty
            or s.params.repetition_penalty != 1.0]
    if not rows:
        return
    vocab = logits.shape[1]
    sub = logits[rows]
    counts = torch.zeros_like(sub)
    seen = torch.zeros_like(sub, dtype=torch.bool)
    for r, i in enumerate(rows):
        s = seqs[i]
        if s.output:
            out = torch.tensor(s.output)
            counts[r].index_add_(0, out, torch.ones(len(s.output)))
        seen[r, torch.tensor(s.prompt + s.output, dtype=torch.long).clamp_(max=vocab - 1)] = True
    freq = torch.tensor([seqs[i].params.frequency_penalty for i in rows]).unsqueeze(1)
    pres = torch.tensor([seqs[i].params.presence_penalty for i in rows]).unsqueeze(1)
    rep = torch.tensor([seqs[i].params.repetition_penalty for i in rows]).unsqueeze(1)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0)
    logits[rows] = sub


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities after top-k, top-p and min-p, in sorted order with the sort's indices, or unsorted."""
    params = [s.params for s in seqs]
    if not any(p.top_k or p.top_p < 1.0 or p.min_p for p in params):
        return torch.softmax(logits, dim=-1), None
    vocab = logits.shape[1]
    logits, order = logits.sort(dim=-1, descending=True)
    if any(p.top_k for p in params):
        k = torch.tensor([p.top_k or vocab for p in params]).unsqueeze(1)
        logits.masked_fill_(torch.arange(vocab).unsqueeze(0) >= k, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params]).unsqueeze(1)
        logits.masked_fill_(probs.cumsum(dim=-1) - probs > top_p, float("-inf"))  # the first token always stays
    if any(p.min_p for p in params):
        min_p = torch.tensor([p.min_p for p in params]).unsqueeze(1)
        logits.masked_fill_(probs < min_p * probs[:, :1], float("-inf"))
    return torch.softmax(logits, dim=-1), order


def _logprobs(raw: torch.Tensor, tokens: list[int], seqs: list[Sequence]) -> list[TokenLogprob | None]:
    """Log probabilities of the model's own distribution (before penalties, temperature and filters)."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs]
    out: list[TokenLogprob | None] = [None] * len(seqs)
    if not rows:
        return out
    logp = torch.log_softmax(raw[rows], dim=-1)
    chosen = logp.gather(1, torch.tensor([tokens[i] for i in rows]).unsqueeze(1)).squeeze(1).tolist()
    k = max(seqs[i].params.top_logprobs for i in rows)
    top_values, top_ids = (logp.topk(k, dim=-1) if k else (None, None))
    for r, i in enumerate(rows):
        s, token = seqs[i], tokens[i]
        top: tuple[TopToken, ...] = ()
        if s.params.top_logprobs:
            ids = top_ids[r, :s.params.top_logprobs].tolist()
            values = top_values[r, :s.params.top_logprobs].tolist()
            top = tuple(TopToken(t, s.detok.token_text(t), v, s.detok.token_bytes(t)) for t, v in zip(ids, values,
                                                                                                      strict=True))
        out[i] = TokenLogprob(token, s.detok.token_text(token), chosen[r], s.detok.token_bytes(token), top)
    return out


def _reviewed(tokens: list[int], seqs: list[Sequence]) -> list[int]:
    """Each row's token after its processors' review (a grammar closing the output within max_tokens)."""
    for i, s in enumerate(seqs):
        for processor in s.logits_processors:
            tokens[i] = processor.review(tokens[i])
    return tokens


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of logits [B, V] (float32, modified in place), and its logprobs when asked."""
    raw = logits.clone() if any(s.params.logprobs for s in seqs) else logits
    for i, s in enumerate(seqs):
        for processor in s.logits_processors:
            processor.apply(logits[i])
    _apply_logit_bias(logits, seqs)
    _apply_penalties(logits, seqs)
    temps = [s.params.temperature for s in seqs]
    greedy = [i for i, t in enumerate(temps) if t == 0.0]
    if len(greedy) == len(seqs):
        tokens = _reviewed(logits.argmax(dim=-1).tolist(), seqs)
        return tokens, _logprobs(raw, tokens, seqs)
    tokens = [0] * len(seqs)
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(dim=-1).tolist(), strict=True):
            tokens[i] = t
    rows = [i for i, t in enumerate(temps) if t > 0.0]
    sub = logits[rows] if greedy else logits
    sampled = [seqs[i] for i in rows]
    sub = sub / torch.tensor([temps[i] for i in rows], dtype=sub.dtype).unsqueeze(1)
    probs, order = _filter(sub, sampled)
    cdf = probs.cumsum(dim=-1)
    u = torch.tensor([s.rng.random() for s in sampled], dtype=cdf.dtype).unsqueeze(1) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
    if order is not None:
        picked = order.gather(1, picked)
    for i, t in zip(rows, picked.squeeze(1).tolist(), strict=True):
        tokens[i] = t
    tokens = _reviewed(tokens, seqs)
    return tokens, _logprobs(raw, tokens, seqs)
