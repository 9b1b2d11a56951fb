"""What constrained decoding costs per choice and step in the reference engine, with and without closing.

  python -m bench.guided_bench [--rounds 5] [--tokens 150]

The processor of one choice (guided.py: apply the mask, review the token, accept it; sampling itself is not
counted) over outputs sampled at temperature 1 from random logits with the demo's vocabulary, three ways,
interleaved round by round on one thread:

- `mask only`: xgrammar's mask and matcher, nothing tracked (as before outputs closed within max_tokens);
- `closing, far`: the same plus the closing tracker, with a budget far beyond the output (the usual case: a byte
  count says the budget suffices);
- `closing, tight`: a budget that makes the tracker count the closing in tokens and steer at the end.

Reports microseconds per token (median over rounds), the part of it that review (the tracker) takes, and the
ratio to `mask only` paired round by round, for a JSON schema and json_object. `mask only` and `closing, far`
process the same tokens; `closing, tight` a shorter output, which the closing forces.
Writes bench/results/guided-<date>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "engines" / "demo"
SCHEMA = {"type": "object", "required": ["name", "status", "address", "items"], "properties": {
    "name": {"type": "string"}, "status": {"enum": ["active", "inactive", "pending"]},
    "address": {"type": "object", "required": ["street", "zip"], "properties": {
        "street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
    "items": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["sku", "qty"], "properties": {
        "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}}}}}


def measure(tokens: int, rounds: int) -> dict:
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    from service.backends.base import GuidedDecoding
    from service.backends.reference.guided import Guides
    from service.backends.vocab import token_byte_table

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "checkpoint")
    guides = Guides(tokenizer, len(tokenizer), {tokenizer.eos_token_id}, token_byte_table(tokenizer),
                    torch.device("cpu"))
    forms = {"json_schema": GuidedDecoding(json_schema=json.dumps(SCHEMA)), "json_object": GuidedDecoding(
        json_object=True)}
    logits = [torch.randn(len(tokenizer), generator=torch.Generator().manual_seed(i)) * 3 for i in range(tokens)]

    def run(guided: GuidedDecoding, budget: int, closing: bool) -> tuple[float, float, int]:
        grammar = guides.grammars.get(guided)
        processor = guides.processor(guided, grammar if closing else dataclasses.replace(grammar, shape=None), budget)
        spent, reviewing, done = 0.0, 0.0, 0
        generator = torch.Generator().manual_seed(0)
        for row in logits[:budget]:
            row = row.clone()
            started = time.perf_counter()
            processor.apply(row)
            spent += time.perf_counter() - started
            sampled = int(torch.multinomial(torch.softmax(row, -1), 1, generator=generator))
            started = time.perf_counter()
            token = processor.review(sampled)
            reviewed = time.perf_counter()
            finished = token in guides.stop_ids or processor.accept(token)
            spent += time.perf_counter() - started
            reviewing += reviewed - started
            done += 1
            if finished:
                break
        return spent, reviewing, done

    modes = {"mask only": (tokens, False), "closing, far": (tokens, True), "closing, tight": (40, True)}
    out: dict = {}
    for form, guided in forms.items():
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        review: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(rounds):
            for mode, (budget, closing) in modes.items():
                spent, reviewing, done = run(guided, budget, closing)
                samples[mode].append(spent / done * 1e6)
                review[mode].append(reviewing / done * 1e6)
        out[form] = {
            "us_per_token": {mode: statistics.median(v) for mode, v in samples.items()},
            "review_us_per_token": {mode: statistics.median(v) for mode, v in review.items()},
            # paired by round: the machine's load drifts between rounds, less within one
            "ratio_to_mask_only": {m: statistics.median(a / b for a, b in zip(samples[m], samples["mask only"],
                                                                                strict=True)) for m in modes},
            "samples": samples}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms = list(result["forms"])
    modes = list(result["forms"][forms[0]]["us_per_token"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        ax.bar([f + i * width for f in range(len(forms))],
               [result["forms"][form]["us_per_token"][mode] for form in forms], width, label=mode)
    ax.set_xticks([f + width * (len(modes) - 1) / 2 for f in range(len(forms))], forms)
    ax.set_ylabel("µs per token and choice (median)")
    ax.set_title("Constrained decoding cost, demo vocabulary (4,096 tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=150)
    args = parser.parse_args(argv)
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": f"python -m bench.guided_bench --rounds {args.rounds} --tokens {args.tokens}",
              "forms": measure(args.tokens, args.rounds)}
    for form, figures in result["forms"].items():
        print(form, {m: f"{v:.1f} µs ({figures['ratio_to_mask_only'][m]:.2f}x; review "
                        f"{figures['review_us_per_token'][m]:.1f} µs)" for m, v in figures["us_per_token"].items()})
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"guided-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out.relative_to(ROOT)} and {out.with_suffix('.png').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
