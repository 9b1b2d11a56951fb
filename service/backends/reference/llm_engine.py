"""The synchronous engine: requests in, one batched forward pass per step, events out.

It owns the model, the KV cache and the scheduler, and runs in a single
thread (see engine.py): nothing here is shared with the event loop except
through the commands it is given and the events step() returns.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from service.backends.base import (
    EngineError,
    Event,
    Finished,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    TokenDelta,
)
from service.backends.reference.block_manager import BlockManager
from service.backends.reference.decode_rows import DecodeRows
from service.backends.reference.detokenizer import IncrementalDetokenizer, token_byte_table
from service.backends.reference.guided import Guides
from service.backends.reference.model import AttentionBatch, load_model
from service.backends.reference.sampler import sample
from service.backends.reference.scheduler import Group, Plan, Scheduler
from service.backends.reference.sequence import Sequence, Status
from service.config import EngineConfig

Emitted = list[tuple[str, Event]]


def _dtype(name: str, checkpoint: Path, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32  # CPUs have no fast half-precision matmuls
        name = json.loads((checkpoint / "config.json").read_text()).get("torch_dtype", "bfloat16")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def eos_token_ids(checkpoint: Path, tokenizer: object) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = checkpoint / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids |= set(value) if isinstance(value, list) else {value} if value is not None else set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)  # type: ignore[attr-defined]
    return ids


class LLMEngine:
    def __init__(self, checkpoint: Path, tokenizer: object, config: EngineConfig) -> None:
        self.device = torch.device(config.device)
        self.dtype = _dtype(config.dtype, checkpoint, self.device)
        self.model = load_model(checkpoint, self.dtype, self.device)
        c = self.model.config
        self.max_len = c.max_position_embeddings
        self.table = token_byte_table(tokenizer)
        self.eos = eos_token_ids(checkpoint, tokenizer)
        self.guides = Guides(tokenizer, c.vocab_size, self.eos, self.table, self.device)
        self.block_size = config.block_size
        num_blocks = max(1, config.max_cache_tokens // config.block_size)
        slots = num_blocks * config.block_size
        self.kv = [(torch.zeros(slots, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=self.device),
                    torch.zeros(slots, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=self.device))
                   for _ in range(c.num_layers)]
        self.scheduler = Scheduler(BlockManager(num_blocks, config.block_size, config.prefix_caching),
                                   config.max_running, config.max_step_tokens)
        self.decode_rows = DecodeRows(self.kv, config.block_size, config.max_running, slots)
        self.prefill_tokens = 0  # prompt tokens computed, over the engine's life (n>1 shares a prefill)
        # Test-only fault injection: called at the start of every step with the ids of the requests in it; what it
        # raises fails the step exactly as a failing forward pass would (an EngineError(fatal=True) stops the engine).
        self.test_fault_hook: Callable[[set[str]], None] | None = None

    # -- requests ------------------------------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Refuses, before admission, what could never run."""
        prompt, params = request.prompt_token_ids, request.sampling
        if not prompt:
            raise InvalidRequest("messages", "the prompt is empty")
        if any(t < 0 or t >= len(self.table) for t in prompt):
            raise InvalidRequest("messages", "the prompt has token ids outside the vocabulary")
        if len(prompt) + params.max_tokens > self.max_len:
            raise InvalidRequest("max_tokens", f"prompt ({len(prompt)} tokens) plus max_tokens "
                                               f"({params.max_tokens}) exceeds the context length ({self.max_len})")
        group = self._group(request)
        if sum(self.scheduler.blocks_needed(group)) > self.scheduler.blocks.num_blocks:
            raise InvalidRequest("max_tokens", "prompt plus max_tokens, over all n choices, exceeds the KV cache "
                                               f"({self.scheduler.blocks.num_blocks * self.block_size} tokens)")

    def _group(self, request: GenerationRequest) -> Group:
        now = time.monotonic()
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        seqs = [Sequence(request.request_id, i, request.prompt_token_ids, request.sampling,
                         random.Random(f"{seed}:{i}"), IncrementalDetokenizer(self.table, request.sampling.stop),
                         request.deadline, now)
                for i in range(request.n)]
        return Group(request.request_id, seqs)

    def add(self, request: GenerationRequest) -> Emitted:
        group = self._group(request)
        if request.guided is not None:
            for seq in group.seqs:
                seq.logits_processors.append(self.guides.processor(request.guided))
        if request.sampling.max_tokens == 0:
            return [(request.request_id, Finished(s.index, FinishReason.LENGTH, len(s.prompt), 0)) for s in group.seqs]
        self.scheduler.add(group)
        return []

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Emitted:
        group = self.scheduler.groups.get(request_id)
        if group is None:
            return []
        return [e for s in group.seqs if s.status is not Status.FINISHED for e in self._finish(s, reason)]

    def fail(self, request_ids: set[str]) -> None:
        for request_id in request_ids:
            group = self.scheduler.groups.get(request_id)
            for seq in group.seqs if group else []:
                self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def _finish(self, seq: Sequence, reason: FinishReason) -> Emitted:
        out: Emitted = []
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            tail = seq.detok.flush()
            if tail:
                out.append((seq.request_id, TokenDelta(seq.index, [], tail)))
        self.scheduler.finish(seq)
        out.append((seq.request_id, Finished(seq.index, reason, len(seq.prompt), len(seq.output), seq.queue_time)))
        return out

    def expire(self, now: float) -> Emitted:
        out: Emitted = []
        for group in list(self.scheduler.groups.values()):
            if group.leader.deadline is not None and now >= group.leader.deadline:
                out += self.abort(group.request_id, FinishReason.DEADLINE)
        return out

    # -- one step ------------------------------------------------------------------------------------------

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def _batch(self, plan: Plan) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        dense = bool(plan.decode) and self.decode_rows.arrange(plan.decode)  # reorders plan.decode to row order
        for seq in plan.decode:
            p = seq.length - 1
            tokens.append(seq.last_token)
            positions.append(p)
            slots.append(seq.blocks[p // self.block_size] * self.block_size + p % self.block_size)
        decode_rows = decode_blocks = decode_mask = decode_positions = None
        if plan.decode:
            d = len(plan.decode)
            decode_rows = torch.arange(d, device=self.device)  # the first d tokens, and the first d dense rows
            decode_positions = torch.tensor(positions, device=self.device)
            if dense:
                span = max(positions) + 1
            else:
                width = max(self.scheduler.blocks.blocks_for(p + 1) for p in positions)
                span = width * self.block_size
                decode_blocks = torch.tensor([s.blocks[:width] + [0] * (width - len(s.blocks)) for s in plan.decode],
                                             device=self.device)
            decode_mask = (torch.arange(span, device=self.device) < decode_positions.unsqueeze(1) + 1).view(
                d, 1, 1, span)
        logit_rows = list(range(len(plan.decode)))
        prefills = []
        for seq, start, n in plan.prefill:
            first = len(tokens)
            tokens += seq.prompt[start:start + n]
            positions += range(start, start + n)
            slots += self._slots(seq, start, start + n)
            blocks = seq.blocks[:self.scheduler.blocks.blocks_for(start + n)]
            prefills.append((first, n, torch.tensor(blocks, device=self.device), start))
            if start + n == len(seq.prompt):
                logit_rows.append(first + n - 1)
        batch = AttentionBatch(self.block_size, torch.tensor(slots, device=self.device),
                               decode_rows, decode_blocks, decode_mask, prefills,
                               self.decode_rows.layers if dense else None, decode_positions)
        return (torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device), batch,
                torch.tensor(logit_rows, dtype=torch.long, device=self.device))  # empty for a mid-prompt chunk

    def _copy_block(self, source: int, target: int) -> None:
        bs = self.block_size
        for k_cache, v_cache in self.kv:
            k_cache[target * bs:(target + 1) * bs] = k_cache[source * bs:(source + 1) * bs]
            v_cache[target * bs:(target + 1) * bs] = v_cache[source * bs:(source + 1) * bs]

    def step(self) -> Emitted:
        """Runs one forward pass over everything scheduled. Raises EngineError naming the requests it failed."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        try:
            if self.test_fault_hook is not None:
                self.test_fault_hook(self._request_ids(plan))
            with torch.inference_mode():
                return self._run(plan)
        except Exception as e:
            raise StepFailed(self._request_ids(plan), e) from e

    @staticmethod
    def _request_ids(plan: Plan) -> set[str]:
        return {s.request_id for s in plan.decode} | {s.request_id for s, _, _ in plan.prefill}

    def _run(self, plan: Plan) -> Emitted:
        tokens, positions, batch, logit_rows = self._batch(plan)
        logits = self.model(tokens, positions, self.kv, batch, logit_rows)
        rows: list[int] = list(range(len(plan.decode)))
        sampled: list[Sequence] = list(plan.decode)
        for seq in plan.decode:
            seq.computed += 1
        row = len(plan.decode)
        for seq, _, n in plan.prefill:
            seq.computed += n
            self.prefill_tokens += n
            self.scheduler.remember_prompt_blocks(seq)
            if seq.computed < len(seq.prompt):
                continue
            seq.status = Status.DECODE
            group = self.scheduler.groups[seq.request_id]
            forks = self.scheduler.fork(group)
            full = len(seq.prompt) // self.block_size
            for fork in forks:
                if len(fork.blocks) > full:
                    self._copy_block(seq.blocks[full], fork.blocks[full])
            for s in (seq, *forks):
                rows.append(row)
                sampled.append(s)
            row += 1
        if not sampled:
            return []
        chosen, logprobs = sample(logits[torch.tensor(rows)] if rows != list(range(len(rows))) else logits, sampled)
        return self._advance(sampled, chosen, logprobs)

    def _advance(self, seqs: list[Sequence], tokens: list[int], logprobs: list) -> Emitted:
        out: Emitted = []
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            seq.output.append(token)
            reason = None
            # A grammar allows EOS only where the output may end: then it ends, ignore_eos or not.
            if token in self.eos and (not seq.params.ignore_eos or seq.logits_processors):
                text, reason = "", FinishReason.STOP
            else:
                text, stopped = seq.detok.add(token)
                if stopped:
                    reason = FinishReason.STOP
                elif len(seq.output) >= seq.params.max_tokens or seq.length >= self.max_len:
                    reason = FinishReason.LENGTH
                for processor in seq.logits_processors:
                    if processor.accept(token) and reason is None:
                        reason = FinishReason.STOP
            out.append((seq.request_id, TokenDelta(seq.index, [token], text, [lp] if lp else None)))
            if reason is not None:
                out += self._finish(seq, reason)
        return out


class StepFailed(EngineError):
    """Fatal when its cause says so (an EngineError(fatal=True)): then no later step can be trusted either."""

    def __init__(self, request_ids: set[str], cause: Exception) -> None:
        super().__init__(f"engine step failed: {type(cause).__name__}: {cause}",
                         fatal=isinstance(cause, EngineError) and cause.fatal)
        self.request_ids = request_ids
