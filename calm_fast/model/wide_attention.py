"""A Transformer shape whose attention is wider (or narrower) than its residual stream.

Some Pocket TTS flow LMs attend at ``attn_dim`` channels (queries, keys and values of
``attn_dim / num_heads`` each) around a residual stream of ``d_model``: in_proj maps
d_model -> (heads + 2 kv_heads) * head_dim and out_proj heads * head_dim -> d_model. Every
calm_fast Transformer path (the dense module, the paged fast step, the native kernel, the
caches) sizes attention by ``head_dim`` and the residual by ``d_model``, so this config only
has to say what ``head_dim`` is; ``TransformerConfig`` itself ties it to d_model.
"""
from __future__ import annotations

from dataclasses import dataclass

from calm_fast.model.config import TransformerConfig


@dataclass(frozen=True)
class WideAttentionConfig(TransformerConfig):
    attn_dim: int = 0  # query width = heads * head_dim (required: 0 is refused)

    def __post_init__(self):
        # not TransformerConfig's check: here d_model need not be a multiple of the heads
        if self.attn_dim < 1 or self.attn_dim % self.num_heads:
            raise ValueError(f"attn_dim {self.attn_dim} is not a positive multiple of "
                             f"{self.num_heads} heads")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"{self.num_heads} heads are not a multiple of {self.kv_heads} "
                             f"kv heads")

    @property
    def head_dim(self) -> int:
        return self.attn_dim // self.num_heads
