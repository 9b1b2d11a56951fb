#!/usr/bin/env python3
"""Puts a model into engines/.

  python build_engine.py --demo                          the small embedded demo model, offline
  python build_engine.py --demo --tokenizer llama-3.1 --name demo-llama-3.1
                                                         the demo with Meta's own Llama 3 tokenizer (llama-models)
  python build_engine.py --model PATH --name NAME        a local Hugging Face checkpoint, reference engine
  python build_engine.py --model FILE.gguf [--name NAME] a GGUF file (llama.cpp, Ollama), or a folder holding one,
                                                         converted for the reference engine
  python build_engine.py --model PATH --name NAME --backend tensorrt-llm
                                                         TensorRT-LLM engines for this machine's GPUs
  python build_engine.py --plan --model llama-3.1-70b-instruct --gpu H100-80GB --gpus 2
                                                         what would be built, with no GPU needed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.repository.build import demo, gguf_import, reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="write a demo model (random weights) to ENGINES_DIR/NAME")
    parser.add_argument("--tokenizer", choices=demo.TOKENIZERS, default="demo",
                        help="with --demo: its tokenizer; llama-3.1 is Meta's Llama 3 tokenizer, converted "
                             "(default NAME: demo-llama-3.1)")
    parser.add_argument("--model", help="local Hugging Face checkpoint folder, GGUF file or folder holding one "
                                        "(or, with --plan, a target model id)")
    parser.add_argument("--name", help="served model name (the folder under ENGINES_DIR); with --demo, default demo; "
                                       "for a GGUF file, default: the file's name without its quantization "
                                       "(Model.Q4_K_M.gguf -> model)")
    parser.add_argument("--engines-dir", type=Path, default=Path("engines"))
    parser.add_argument("--backend", choices=["reference", "tensorrt-llm", "pytorch"], default="reference",
                        help="reference: PyTorch engine; tensorrt-llm: build engines (TensorRT-LLM 1.2); "
                             "pytorch: TensorRT-LLM's PyTorch backend profile (1.3+)")
    trt = parser.add_argument_group("TensorRT-LLM", "engine builds and plans (see docs/tensorrt-llm.md)")
    trt.add_argument("--plan", action="store_true", help="print what would be built and its memory estimate; "
                     "needs no GPU and no TensorRT-LLM")
    trt.add_argument("--gpu", help="GPU to plan for, e.g. H100-80GB, H200, A100-80GB, L40S (default: detected)")
    trt.add_argument("--gpus", type=int, help="number of GPUs to plan for (default: detected)")
    trt.add_argument("--dtype", choices=["auto", "fp8", "bf16", "fp16"], default="auto",
                     help="weight precision; auto: fp8 on sm89 and newer, else bf16")
    trt.add_argument("--tp", type=int, help="tensor-parallel size (default: the smallest that fits)")
    trt.add_argument("--max-batch-size", type=int, default=64)
    trt.add_argument("--max-seq-len", type=int, help="default: the model's context length")
    trt.add_argument("--max-num-tokens", type=int, default=8192, help="most tokens per engine step")
    args = parser.parse_args(argv)
    if args.demo:
        name = args.name or ("demo" if args.tokenizer == "demo" else f"demo-{args.tokenizer}")
        demo.build_demo(args.engines_dir / name, args.tokenizer)
        return 0
    if args.plan or args.backend != "reference":
        from service.repository.build import trtllm  # only here: planning and building never load for the demo

        return trtllm.run(args)
    if not args.model:
        parser.error("--model is required (or --demo)")
    gguf = gguf_file(Path(args.model))
    if gguf is not None:
        gguf_import.import_gguf(gguf, args.name, args.engines_dir)
        return 0
    if not args.name:
        parser.error("--name is required with a Hugging Face checkpoint")
    reference.import_checkpoint(Path(args.model), args.name, args.engines_dir)
    return 0


def gguf_file(model: Path) -> Path | None:
    """The GGUF file --model names: the file itself, or the one .gguf in a folder without a config.json."""
    if model.suffix == ".gguf":
        if not model.is_file():
            raise SystemExit(f"{model}: no such file")
        return model
    if not model.is_dir() or (model / "config.json").exists():
        return None
    found = sorted(model.glob("*.gguf"))
    if len(found) > 1:
        raise SystemExit(f"{model} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); "
                         "name one in --model")
    return found[0] if found else None


if __name__ == "__main__":
    sys.exit(main())
