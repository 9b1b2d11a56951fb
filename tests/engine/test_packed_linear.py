"""The CPU's prepacked linear layers: torch's own results, and a token's arithmetic independent of its step."""

from __future__ import annotations

import pytest
import torch

from service.backends.reference.packed_linear import PackedLinear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


def rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 96, generator=torch.Generator().manual_seed(seed)).bfloat16()


WEIGHT = torch.randn(160, 96, generator=torch.Generator().manual_seed(0)).bfloat16()


@pytest.mark.parametrize("n", [1, 7, 32, 33, 100])
def test_it_computes_what_torch_does(n: int) -> None:
    x = rows(n, n)
    want = torch.nn.functional.linear(x.float(), WEIGHT.float())
    for linear in (PackedLinear(WEIGHT), PackedLinear(WEIGHT, wide=True)):
        with torch.inference_mode():
            assert torch.allclose(linear(x).float(), want, rtol=2e-2, atol=5e-2)
            assert torch.allclose(linear(x, 0).float(), want, rtol=2e-2, atol=5e-2)


def test_prompt_rows_take_the_float32_kernel_and_decode_rows_the_bfloat16_one_whatever_shares_the_step() -> None:
    linear = PackedLinear(WEIGHT, wide=True)
    decode, prompt = rows(5, 1), rows(40, 2)
    with torch.inference_mode():
        mixed = linear(torch.cat((decode, prompt)), 5)
        alone_decode = linear(decode)            # a step of decode tokens alone
        alone_prompt = linear(prompt, 0)         # a step of the prompt alone
        wider = linear(torch.cat((decode[:2], prompt[:3])), 2)  # fewer neighbours, other padded sizes
    assert torch.equal(mixed[:5], alone_decode)
    assert torch.equal(mixed[5:], alone_prompt)
    assert torch.equal(wider[:2], alone_decode[:2]) and torch.equal(wider[2:], alone_prompt[:3])
