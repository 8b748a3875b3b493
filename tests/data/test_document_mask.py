"""``data.document_mask``: attention stops at document boundaries (the model's forward with ``doc_BS``)."""

from __future__ import annotations

import torch

from moe_dist.config import ModelConfig
from moe_dist.models import build_model
from moe_dist.models.attention import document_mask

SMALL = {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "vocab_size": 64}


def test_mask_is_causal_within_documents() -> None:
    mask = document_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_a_document_does_not_see_the_one_before() -> None:
    model = build_model(ModelConfig(**SMALL), seed=0).eval()
    x_BS = torch.randint(1, 64, (1, 12))
    doc_BS = torch.tensor([[0] * 5 + [1] * 7])
    changed_BS = x_BS.clone()
    changed_BS[0, :5] = torch.randint(1, 64, (5,))  # another first document
    with torch.no_grad():
        masked, _, _ = model(x_BS, doc_BS)
        masked_changed, _, _ = model(changed_BS, doc_BS)
        alone, _, _ = model(x_BS[:, 5:])  # the second document on its own
        unmasked, _, _ = model(x_BS)
        unmasked_changed, _, _ = model(changed_BS)
    assert torch.allclose(masked[:, 5:], masked_changed[:, 5:], atol=1e-5)
    # RoPE is relative: the second document alone at positions 0.. is the same computation
    assert torch.allclose(masked[:, 5:], alone, atol=1e-4)
    assert not torch.allclose(unmasked[:, 5:], unmasked_changed[:, 5:], atol=1e-3)
    # one document everywhere = plain causal attention
    with torch.no_grad():
        one_doc, _, _ = model(x_BS, torch.zeros_like(x_BS))
    assert torch.allclose(one_doc, unmasked, atol=1e-5)
