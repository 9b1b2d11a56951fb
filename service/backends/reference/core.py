"""The engine core: requests in, one batched step at a time, events out.

It owns the request lifecycle (check, add, abort, expire, finish) and what a
step does around the forward pass: which rows are sampled, prompt blocks
offered to the prefix cache, forks of n > 1 after the shared prefill, and each
sampled token through EOS, the detokenizer, stop strings and the grammar. The
forward pass itself is the model runner's. It runs in a single thread (see
loop.py): nothing here is shared with the event loop except through the
commands it is given and the events step() returns. A request whose grammar
is new waits for it in `compiling` (worker threads) and is admitted when the
loop finds it ready, so no compilation ever runs inside a step.
"""

from __future__ import annotations

import random
import time
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
from service.backends.detokenizer import IncrementalDetokenizer
from service.backends.grammar import Grammar
from service.backends.reference.block_manager import BlockManager
from service.backends.reference.compiling import Compiling
from service.backends.reference.guided import Guides
from service.backends.reference.model_runner import ModelRunner
from service.backends.reference.sampler import sample
from service.backends.reference.scheduler import Group, Plan, Scheduler
from service.backends.reference.sequence import Sequence, Status
from service.backends.vocab import eos_token_ids, special_token_ids, token_byte_table
from service.config import EngineConfig

Emitted = list[tuple[str, Event]]
Posted = list[tuple[str, Event | BaseException]]   # a request's events, or the error its stream raises


class EngineCore:
    def __init__(self, checkpoint: Path, tokenizer: object, config: EngineConfig) -> None:
        self.runner = ModelRunner(checkpoint, config)
        c = self.runner.model.config
        self.max_len = c.max_position_embeddings
        self.table = token_byte_table(tokenizer)
        self.eos = eos_token_ids(checkpoint, tokenizer)
        self.special = special_token_ids(tokenizer)
        self.guides = Guides(tokenizer, c.vocab_size, self.eos, self.table, self.runner.device)
        self.compiling = Compiling(self.guides.grammars, config.grammar_threads, config.grammar_compile_timeout)
        self.block_size = config.block_size
        self.scheduler = Scheduler(BlockManager(self.runner.num_blocks, config.block_size, config.prefix_caching),
                                   config.max_running, config.max_step_tokens)
        self.prefill_tokens = 0  # prompt tokens computed, over the engine's life (n>1 shares a prefill)

    # -- requests ------------------------------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Refuses, before admission, what could never run."""
        prompt, params = request.prompt_token_ids, request.sampling
        if not prompt:
            raise InvalidRequest("messages", "the prompt is empty")
        if any(t < 0 or t >= len(self.table) for t in prompt):
            raise InvalidRequest("messages", "the prompt has token ids outside the vocabulary")
        if any(t >= len(self.table) for t, _ in params.logit_bias):
            raise InvalidRequest("logit_bias", "a token id outside the vocabulary")
        if len(prompt) + params.max_tokens > self.max_len:
            raise InvalidRequest("max_tokens", f"prompt ({len(prompt)} tokens) plus max_tokens "
                                               f"({params.max_tokens}) exceeds the context length ({self.max_len})")
        if request.n > self.scheduler.max_running:
            raise InvalidRequest("n", f"{request.n} choices are decoded together, and this engine decodes at most "
                                      f"{self.scheduler.max_running} sequences at once (--max-running)")
        group = self._group(request)
        if sum(self.scheduler.blocks_needed(group)) > self.scheduler.blocks.num_blocks:
            raise InvalidRequest("max_tokens", "prompt plus max_tokens, over all n choices, exceeds the KV cache "
                                               f"({self.scheduler.blocks.num_blocks * self.block_size} tokens)")

    def _group(self, request: GenerationRequest) -> Group:
        now = time.monotonic()
        seed = request.sampling.seed if request.sampling.seed is not None else random.getrandbits(63)
        params = request.sampling
        silent = self.special if params.skip_special_tokens else frozenset()  # their text is left out
        seqs = [Sequence(request.request_id, i, request.prompt_token_ids, params, random.Random(f"{seed}:{i}"),
                         IncrementalDetokenizer(self.table, params.stop, silent), request.deadline, now)
                for i in range(request.n)]
        return Group(request.request_id, seqs)

    def add(self, request: GenerationRequest) -> Emitted:
        """Admits a checked request, or leaves it to wait for its grammar (see admit_compiled)."""
        grammar = None
        if request.guided is not None:
            grammar = self.guides.grammars.lookup(request.guided)
            if grammar is None:
                self.compiling.submit(request)
                return []
        return self._admit(request, grammar)

    def _admit(self, request: GenerationRequest, grammar: Grammar | None) -> Emitted:
        group = self._group(request)
        if request.guided is not None and grammar is not None:
            self.guides.fits(request.guided, grammar, request.sampling.max_tokens)
            for seq in group.seqs:
                seq.logits_processors.append(self.guides.processor(request.guided, grammar,
                                                                   request.sampling.max_tokens))
        if request.sampling.max_tokens == 0:
            return [(request.request_id, Finished(s.index, FinishReason.LENGTH, 0)) for s in group.seqs]
        self.scheduler.add(group)
        return []

    def admit_compiled(self, now: float) -> Posted:
        """Requests whose grammar is ready join the scheduler; refused or expired ones end."""
        out: Posted = []
        for request, outcome in self.compiling.ready(now):
            if isinstance(outcome, Grammar):
                try:
                    out += self._admit(request, outcome)
                    continue
                except InvalidRequest as e:
                    outcome = e
            out.append((request.request_id, outcome))
        for request in self.compiling.expired(now):
            out += [(request.request_id, Finished(i, FinishReason.DEADLINE, 0)) for i in range(request.n)]
        return out

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Emitted:
        compiling = self.compiling.remove(request_id)
        if compiling is not None:
            return [(request_id, Finished(i, reason, 0)) for i in range(compiling.n)]
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
        return bool(self.scheduler.running or self.scheduler.waiting or len(self.compiling))

    def _finish(self, seq: Sequence, reason: FinishReason) -> Emitted:
        out: Emitted = []
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            tail = seq.detok.flush()
            if tail:
                out.append((seq.request_id, TokenDelta(seq.index, [], tail)))
        self.scheduler.finish(seq)
        out.append((seq.request_id, Finished(seq.index, reason, len(seq.output), seq.queue_time)))
        return out

    def expire(self, now: float) -> Emitted:
        out: Emitted = []
        for group in list(self.scheduler.groups.values()):
            if group.leader.deadline is not None and now >= group.leader.deadline:
                out += self.abort(group.request_id, FinishReason.DEADLINE)
        return out

    # -- one step ------------------------------------------------------------------------------------------

    def step(self) -> Emitted:
        """Runs one forward pass over everything scheduled. Raises EngineError naming the requests it failed."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        try:
            with torch.inference_mode():
                return self._run(plan)
        except Exception as e:
            raise StepFailed(self.request_ids(plan), e) from e

    @staticmethod
    def request_ids(plan: Plan) -> set[str]:
        return {s.request_id for s in plan.decode} | {s.request_id for s, _, _ in plan.prefill}

    def _run(self, plan: Plan) -> Emitted:
        logits = self.runner.forward(plan)
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
                    self.runner.copy_block(seq.blocks[full], fork.blocks[full])
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
            # A grammar allows EOS only where the output may end: then it ends, ignore_eos or not. Where the
            # budget forced the ending (see guided.py), the reason is length: the model did not choose to stop.
            closed = any(p.closed_by_budget for p in seq.logits_processors)
            if token in self.eos and (not seq.params.ignore_eos or seq.logits_processors):
                text, reason = "", FinishReason.LENGTH if closed else FinishReason.STOP
            else:
                text, stopped = seq.detok.add(token)
                if stopped:
                    reason = FinishReason.STOP
                elif len(seq.output) >= seq.params.max_tokens or seq.length >= self.max_len:
                    reason = FinishReason.LENGTH
                for processor in seq.logits_processors:
                    if processor.accept(token) and reason is None:
                        reason = FinishReason.LENGTH if processor.closed_by_budget else FinishReason.STOP
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
