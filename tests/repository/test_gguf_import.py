"""`build_engine.py --model FILE.gguf` on small GGUF files written here the way llama.cpp writes them.

A random tiny Llama goes to GGUF with llama.cpp's q/k row permutation (F32, then Q8_0), comes back through
the import, and must compute the original model's logits: exactly the original's for F32, and exactly the
original's with each matrix quantized and dequantized in place for Q8_0 (blocks run along rows, and the
permutation moves whole rows). Files of another architecture or of a tensor type gguf-py cannot
dequantize get one error naming what is unsupported; Llama 3.1's rope_freqs tensor becomes rope_scaling again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

import build_engine
from service.backends.reference.model import AttentionBatch, load_model
from service.repository.build import gguf_llama
from service.repository.manifest import load_manifest

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
IDS = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(1))


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257 + len(SPECIALS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written independently of the importer's inverse."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    parts = hf.split(".")
    if parts[1] == "layers":
        leaf = {v: k for k, v in gguf_llama.LAYER_TENSORS.items()}[".".join(parts[3:-1])]
        return f"blk.{parts[2]}.{leaf}.weight"
    return {v: k for k, v in gguf_llama.GLOBAL_TENSORS.items()}[hf.rsplit(".", 1)[0]] + ".weight"


def _finish(w: GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_gguf(path: Path, model: LlamaForCausalLM, qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
               arch: str = "llama") -> None:
    cfg = model.config
    w = GGUFWriter(path, arch)
    w.add_name("Tiny Llama")
    w.add_organization("Testers")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([*bytes_to_unicode().values(), "ĠĠ", *SPECIALS])  # 256 bytes, one merge, the specials
    w.add_token_merges(["Ġ Ġ"])
    w.add_token_types([1] * 257 + [3] * len(SPECIALS))
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_eot_token_id(257)
    w.add_chat_template(TEMPLATE)
    for name, value in model.state_dict().items():
        gname, value = _gguf_name(name), value.numpy()
        if gname.endswith("attn_q.weight"):
            value = llama_cpp_permute(value, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            value = llama_cpp_permute(value, cfg.num_key_value_heads)
        if value.ndim == 2 and qtype != GGMLQuantizationType.F32:
            w.add_tensor(gname, quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(value, dtype=np.float32))
    _finish(w)


def _logits(model: LlamaForCausalLM) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS[None]).logits[0]


def _reference_engine_logits(checkpoint: Path) -> torch.Tensor:
    """The last position's logits from llmserve's own Llama over a paged cache: one prefill of IDS."""
    model = load_model(checkpoint, torch.float32, torch.device("cpu"))
    c, n, block = model.config, len(IDS), 16
    kv = [(torch.zeros(2 * block, c.num_kv_heads, c.head_dim), torch.zeros(2 * block, c.num_kv_heads, c.head_dim))
          for _ in range(c.num_layers)]
    batch = AttentionBatch(block, torch.arange(n), None, None, None, [(0, n, torch.tensor([0, 1]), 0)], None, None)
    with torch.inference_mode():
        return model(IDS, torch.arange(n), kv, batch, torch.tensor([n - 1]))[0]


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0], ids=lambda q: q.name)
def test_a_llama_cpp_file_imports_to_the_same_model(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    model = tiny_model()
    write_gguf(tmp_path / f"Tiny-Llama.{qtype.name}.gguf", model, qtype)
    reference = tiny_model()
    if qtype != GGMLQuantizationType.F32:
        with torch.no_grad():
            for p in reference.parameters():
                if p.dim() == 2:
                    p.copy_(torch.from_numpy(dequantize(quantize(p.numpy(), qtype), qtype)))
    expected = _logits(reference)

    assert build_engine.main(["--model", str(tmp_path / f"Tiny-Llama.{qtype.name}.gguf"),
                              "--engines-dir", str(tmp_path / "engines")]) == 0
    manifest = load_manifest(tmp_path / "engines" / "tiny-llama")  # the file's name without its quantization
    assert (manifest.name, manifest.backend, manifest.owned_by, manifest.context_length) == \
        ("tiny-llama", "reference", "Testers", 128)
    got = _logits(LlamaForCausalLM.from_pretrained(manifest.checkpoint).eval())
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-6
    ours = _reference_engine_logits(manifest.checkpoint)
    assert ((ours - expected[-1]).abs().max() / expected.abs().max()).item() < 1e-5


def test_the_tokenizer_keeps_the_template_the_end_tokens_and_llama_cpp_digit_splitting(tmp_path: Path) -> None:
    write_gguf(tmp_path / "tiny.gguf", tiny_model())
    build_engine.main(["--model", str(tmp_path), "--name", "tiny", "--engines-dir", str(tmp_path / "engines")])
    checkpoint = tmp_path / "engines" / "tiny" / "checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.chat_template == TEMPLATE
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    # llama.cpp's `smollm` pre-tokenizer splits digits one by one first, so the spaces merge apart from the digit
    assert tokenizer.tokenize("x  2") == ["x", "ĠĠ", "2"]
    assert json.loads((checkpoint / "generation_config.json").read_text())["eos_token_id"] == [259, 257]
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is False


def test_unsupported_files_get_one_error_naming_what(tmp_path: Path) -> None:
    write_gguf(tmp_path / "qwen.gguf", tiny_model(), arch="qwen2")
    with pytest.raises(SystemExit, match=r"general\.architecture 'qwen2' is not supported"):
        build_engine.main(["--model", str(tmp_path / "qwen.gguf"), "--engines-dir", str(tmp_path / "engines")])
    # Q8_K is llama.cpp's intermediate type for dot products, which gguf-py cannot dequantize
    w = GGUFWriter(tmp_path / "q8k.gguf", "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 292), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q8_K)
    _finish(w)
    with pytest.raises(SystemExit, match=r"tensor types that cannot be dequantized are not supported: Q8_K \(1 "):
        build_engine.main(["--model", str(tmp_path / "q8k.gguf"), "--engines-dir", str(tmp_path / "engines")])
    assert not (tmp_path / "engines").exists() or not any((tmp_path / "engines").iterdir())
    (tmp_path / "text.gguf").write_text("not a GGUF file")
    with pytest.raises(SystemExit, match="not a GGUF file gguf-py can read"):
        build_engine.main(["--model", str(tmp_path / "text.gguf"), "--engines-dir", str(tmp_path / "engines")])
    with pytest.raises(SystemExit, match="holds 3 GGUF files"):
        build_engine.main(["--model", str(tmp_path), "--engines-dir", str(tmp_path / "engines")])


def test_llama3_rope_freqs_become_rope_scaling_again() -> None:
    published = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / 500000.0 ** (np.arange(0, 128, 2, dtype=np.float64) / 128)
    # llama.cpp's own loop (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors)
    factors = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / 8 + smooth))
    assert gguf_llama.llama3_rope_scaling(np.array(factors, dtype=np.float32), 128, 500000.0) == published
    assert gguf_llama.llama3_rope_scaling(np.ones(64), 128, 500000.0) is None
