"""`llmserve`: serve, and the tools around serving."""

from __future__ import annotations

import argparse
import asyncio
import sys

from service import healthcheck
from service.config import add_config_arguments, config_from_args
from service.loadgen import runner as loadgen
from service.repository import profiles, trtllm_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmserve", description="Chat completions for Llama-family models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve gRPC (and the REST shim and /metrics) on the engines directory",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(serve)
    rest = commands.add_parser("rest", help="the OpenAI-compatible REST shim alone, fronting a gRPC server "
                               "(--upstream HOST:PORT)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(rest)
    bench = commands.add_parser("bench", help="load-test llmserve or any OpenAI-compatible server; JSON results, plot",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    loadgen.add_arguments(bench)
    health = commands.add_parser("healthcheck", help="exit 0 when a server answers SERVING to gRPC health")
    healthcheck.add_arguments(health)
    listing = commands.add_parser("profiles", help="list each model's TensorRT-LLM profiles and the one this "
                                  "machine (or --gpu/--gpus) would use",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    profiles.add_arguments(listing)
    worker = commands.add_parser("trtllm-worker", help="run TensorRT-LLM's gRPC server (trtllm-serve --grpc) on "
                                 "the profile of a model that fits this machine's GPUs, for --worker NAME=trtllm://...",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    trtllm_worker.add_arguments(worker)
    args = parser.parse_args(argv)
    if args.command == "healthcheck":
        return healthcheck.main(args)
    if args.command == "profiles":
        return profiles.main(args)
    if args.command == "trtllm-worker":
        return trtllm_worker.main(args)
    if args.command == "bench":
        return loadgen.main(args)
    if args.command == "rest":
        from service.rest.upstream import serve_rest

        return asyncio.run(serve_rest(config_from_args(args)))
    if args.command == "serve":
        from service.server import serve as run_server

        return asyncio.run(run_server(config_from_args(args)))
    return 2


if __name__ == "__main__":
    sys.exit(main())
