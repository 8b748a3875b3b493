"""LPR's router initialisation: Hugging Face's (the official models') by default, PyTorch's as an option."""

from __future__ import annotations

import pytest
import torch

from moe_dist.routing.lpr import LPRConfig, LPRRouter


def _router(init: str, hidden: int = 128) -> LPRRouter:
    torch.manual_seed(0)
    return LPRRouter(LPRConfig(top_k=8, init=init), hidden_size=hidden, num_experts=64)


def test_hf_init_is_normal_002_with_zero_bias() -> None:
    r = _router("hf", hidden=512)
    for lin in (r.encoder, r.out_proj):
        assert torch.count_nonzero(lin.bias) == 0
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert lin.weight.mean().abs().item() < 0.002
    assert r.expert_keys.std().item() == pytest.approx(1.0, rel=0.1)  # randn keys, left alone as HF does


def test_torch_init_keeps_pytorchs_default_and_makes_the_decoded_latent_larger() -> None:
    hf, pt = _router("hf"), _router("torch")
    # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); out_proj has fan_in = d_lat = 16
    bound = 1 / 16**0.5
    assert pt.out_proj.weight.abs().max().item() <= bound and pt.out_proj.weight.std().item() > 0.1
    assert torch.count_nonzero(pt.out_proj.bias) > 0
    x_TH = torch.randn(256, 128)
    ratio = {
        name: (r(x_TH).expert_input_delta_TH.norm(dim=-1) / x_TH.norm(dim=-1)).mean().item()
        for name, r in (("hf", hf.eval()), ("torch", pt.eval()))
    }
    # The decoded latent added to the experts' input, relative to that input, at init.
    assert ratio["hf"] < 0.05 < ratio["torch"]
