"""How often a lower precision gives float32's greedy answer, on a real model.

  python -m bench.agreement [--model smollm2-135m-instruct] [--dtypes bfloat16] [--max-tokens 64]

bfloat16 weights keep 8 bits of mantissa: most greedy steps pick the same token as float32, and a near-tie
that flips sends the rest of the answer elsewhere (still the model's own text, rarely worse). So the
figures are, over varied chats, temperature 0: the share of answers identical to float32's, the share whose
first token agrees, the mean length of the common prefix as a share of float32's answer, and the largest
logprob difference over the common prefix. One llmserve server per dtype, one at a time, float32 first.
Writes bench/results/agreement-<date>-<model>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
from typing import Any

import grpc

from bench.record import ENGINES, PEERS_DIR, RESULTS, LlmserveServer
from service.gen.llmserve.v1 import chat_pb2, chat_pb2_grpc

CHATS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "What is 12 + 30? Then list three prime numbers above 100.",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis to a ten-year-old.",
    "Give me three tips for a job interview.",
    "What causes the seasons on Earth?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a coffee shop run by cats.",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
    "Write a limerick about a programmer.",
    "What are the planets of the solar system, in order?",
    "Describe a rainy day in a city in three sentences.",
    "What is a prime number? Give two examples.",
    "Write a SQL query that counts the rows of a table named orders.",
    "What should I pack for a weekend hiking trip?",
    "Tell me a fun fact about octopuses.",
    "How does a bicycle stay upright?",
    "What is the boiling point of water at sea level, in Celsius and Fahrenheit?",
    "Write a short thank-you note to a teacher.",
    "List four renewable sources of energy.",
]


async def answers(port: int, model: str, max_tokens: int) -> list[dict[str, Any]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def ask(i: int, content: str) -> dict[str, Any]:
            reply = await stub.CreateChatCompletion(chat_pb2.ChatCompletionRequest(
                model=model, messages=[chat_pb2.ChatMessage(role="user", content=content)], temperature=0,
                max_tokens=max_tokens, logprobs=True), timeout=600)
            entries = reply.choices[0].logprobs.content
            print(f"  {i + 1}/{len(CHATS)}", end="\r", flush=True)
            return {"text": reply.choices[0].message.content, "tokens": [bytes(e.bytes).hex() for e in entries],
                    "logprobs": [e.logprob for e in entries]}

        return list(await asyncio.gather(*(ask(i, c) for i, c in enumerate(CHATS))))


def served(model: str, dtype: str, max_tokens: int, threads: int) -> list[dict[str, Any]]:
    server = LlmserveServer(model, PEERS_DIR / f"agreement-{dtype}.log", threads, "--dtype", dtype)
    try:
        server.wait_serving()
        return asyncio.run(answers(server.grpc_port, model, max_tokens))
    finally:
        server.stop()


def compare(reference: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    prefixes, deltas = [], []
    for a, b in zip(reference, other, strict=True):
        common = 0
        while common < min(len(a["tokens"]), len(b["tokens"])) and a["tokens"][common] == b["tokens"][common]:
            common += 1
        prefixes.append(common / max(1, len(a["tokens"])))
        deltas += [abs(x - y) for x, y in zip(a["logprobs"][:common], b["logprobs"][:common], strict=True)]
    n = len(reference)
    return {"identical": sum(a["tokens"] == b["tokens"] for a, b in zip(reference, other, strict=True)) / n,
            "first_token": sum(a["tokens"][:1] == b["tokens"][:1] for a, b in zip(reference, other, strict=True)) / n,
            "common_prefix": sum(prefixes) / n, "per_chat_common_prefix": prefixes,
            "max_logprob_delta": max(deltas, default=0.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated dtypes to compare with float32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not (ENGINES / args.model / "manifest.json").is_file():
        raise SystemExit(f"no model {args.model!r} in engines/: `make smollm2` builds SmolLM2-135M-Instruct")
    dtypes = ["float32", *args.dtypes.split(",")]
    outputs = {}
    for i, dtype in enumerate(dtypes, 1):
        print(f"[{i}/{len(dtypes)}] {args.model} in {dtype}: {len(CHATS)} greedy chats", flush=True)
        outputs[dtype] = served(args.model, dtype, args.max_tokens, args.threads)
    results = {dtype: compare(outputs["float32"], outputs[dtype]) for dtype in dtypes[1:]}
    for dtype, r in results.items():
        print(f"{dtype} against float32: {r['identical']:.0%} identical answers, first token {r['first_token']:.0%}, "
              f"common prefix {r['common_prefix']:.0%} of float32's answer on average, logprobs within "
              f"{r['max_logprob_delta']:.3f} over it")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"agreement-{datetime.date.today().isoformat()}-{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "chats": CHATS,
                               "results": results, "answers": outputs}, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for dtype, r in results.items():
        ax.bar(range(len(CHATS)), r["per_chat_common_prefix"], label=dtype)
    ax.set(xlabel="chat", ylabel="common prefix / float32 answer", ylim=(0, 1.05),
           title=f"{args.model}: greedy answers agreeing with float32 ({args.max_tokens} tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.relative_to(ENGINES.parent)} and its PNG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
