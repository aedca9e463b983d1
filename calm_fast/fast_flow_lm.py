"""One generation frame of a Pocket TTS–layout flow LM on calm_fast's fast paths.

    latent_{n+1}, eos = head(out_norm(backbone(input_linear(latent_n))), noise)

with a prefix (voice-prompt and text embeddings, already in model space) prefilled once per
stream. Weights come from a state dict in the published key layout (``input_linear``,
``bos_emb``, ``transformer.*``, ``out_norm``, ``out_eos``, ``flow_net.*``), so a
pocket-tts ``FlowLMModel`` can be run here unchanged; with one stream and the global RNG
the frames equal the published module's own (see python_tests/test_fast_flow_lm.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fast_backbone as fb
from .kernels.fused_head import PackedHead, head_cpu, lsd_decode, pack_head
from .sampling import gaussian_noise


@dataclass
class FastFlowLM:
    backbone: fb.PackedBackbone
    head: PackedHead
    w_in: torch.Tensor  # [ldim, d]
    bos: torch.Tensor  # [ldim]
    norm_w: torch.Tensor
    norm_b: torch.Tensor
    eos_w: torch.Tensor  # [d, 1]
    eos_b: torch.Tensor
    ldim: int
    d_model: int

    @classmethod
    def from_state_dict(cls, sd: dict, heads: int, kv_heads: int | None = None,
                        max_period: float = 10_000.0) -> "FastFlowLM":
        need = ["input_linear.weight", "bos_emb", "out_norm.weight", "out_norm.bias",
                "out_eos.weight", "out_eos.bias"]
        missing = [k for k in need if k not in sd]
        if missing:
            raise KeyError(f"not a Pocket TTS flow-LM state dict: missing {missing}")
        if any(k.startswith("z_proj.") for k in sd):
            raise ValueError("flow LMs with a z_proj are not supported by the fast path yet")
        w_in = sd["input_linear.weight"].detach()
        return cls(
            backbone=fb.pack_transformer(sd, "transformer.", heads, kv_heads, max_period),
            head=pack_head(sd, "flow_net."),
            w_in=w_in.t().contiguous(), bos=sd["bos_emb"].detach(),
            norm_w=sd["out_norm.weight"].detach(), norm_b=sd["out_norm.bias"].detach(),
            eos_w=sd["out_eos.weight"].detach().t().contiguous(),
            eos_b=sd["out_eos.bias"].detach(), ldim=w_in.shape[1], d_model=w_in.shape[0])

    def make_cache(self, num_blocks: int, block_size: int = 16, max_streams: int = 256):
        return self.backbone.make_cache(num_blocks, block_size, max_streams)

    @torch.no_grad()
    def prefill(self, cache, stream: int, prefix: torch.Tensor) -> None:
        """Conditioning rows already in model space (voice, text): [T, d]."""
        if prefix.dim() != 2 or prefix.shape[1] != self.d_model:
            raise ValueError(f"prefix must be [T, {self.d_model}], got {tuple(prefix.shape)}")
        if not torch.isfinite(prefix).all():
            raise ValueError("prefix holds NaN or Inf")
        if prefix.shape[0]:
            fb.prefill(self.backbone, cache, stream, prefix, outputs=False)

    @torch.no_grad()
    def step(self, cache, streams, latents: torch.Tensor, *, temp: float = 0.7,
             lsd_steps: int = 1, eos_threshold: float = -4.0, noise: torch.Tensor | None = None,
             generators=None):
        """One frame for every stream. latents [B, ldim] are the previous frames (NaN rows
        mean BOS). Noise is N(0, temp) drawn per stream from ``generators`` (one
        torch.Generator each) or, when None, from the global RNG in batch order (the
        published model's draw). Returns (next latents [B, ldim], eos [B] bool, logits)."""
        B = len(streams)
        if latents.shape != (B, self.ldim):
            raise ValueError(f"latents must be [{B}, {self.ldim}], got {tuple(latents.shape)}")
        x = torch.where(torch.isnan(latents), self.bos, latents) @ self.w_in
        z = fb.step(self.backbone, cache, streams, x)
        z = F.layer_norm(z, (self.d_model,), self.norm_w, self.norm_b, 1e-5)
        logits = (z @ self.eos_w + self.eos_b)[:, 0]
        if noise is None:
            std = temp ** 0.5
            if generators is None:
                noise = torch.empty(B, self.ldim).normal_(0.0, std)
            else:
                noise = gaussian_noise([temp] * B, self.ldim, generators=generators)
        out = lsd_decode(head_cpu, self.head, z, noise, lsd_steps)
        return out, logits > eos_threshold, logits
