"""The nn.Module Transformer (the dense oracle): masks, padding, shapes."""
import pytest
import torch

from calm_fast.model.config import TransformerConfig
from calm_fast.model.transformer import Transformer, causal_mask


def make(kv=None, ls=None):
    torch.manual_seed(0)
    return Transformer(TransformerConfig(32, 2, 4, num_kv_heads=kv, layer_scale=ls)).eval()


def test_left_padding_is_invisible_to_real_rows():
    tr = make()
    x = torch.randn(1, 7, 32)
    pad = torch.cat([torch.randn(1, 3, 32), x], 1)
    keys = torch.tensor([[False] * 3 + [True] * 7])
    mask = causal_mask(10)[None] & keys[:, None] | torch.eye(10, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(tr(pad, mask[:, None])[:, 3:], tr(x), rtol=1e-5, atol=1e-5)


def test_banded_mask():
    m = causal_mask(5, window=2)
    assert m.tolist()[4] == [False, False, False, True, True]
    assert m.tolist()[0] == [True, False, False, False, False]


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        make()(torch.randn(3, 32))
    with pytest.raises(ValueError, match="multiple"):
        TransformerConfig(30, 1, 4)
