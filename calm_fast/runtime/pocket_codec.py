"""A Pocket TTS Mimi -> calm_fast VAEs, one for encoding and one for decoding.

calm_fast's ``VAE`` has one shape for both of its sides, as the first Mimi configs do. The
newer ones decode with their own SEANet and Transformer (``decoder_seanet``,
``decoder_transformer``: narrower, another kernel, more layers, another window) and a
quantizer / upsampler of ``outer_dim`` channels. Each side is then a calm_fast VAE of that
side's shapes: voice prompts are encoded by one, frames decoded by the other (the engine's
fast decode path takes the decoding one as it takes any VAE); the side a VAE does not use
keeps its initial weights and refuses to run (``OneSideVAE``).

The shapes come from the package's ``MimiConfig`` (the head count and the attention window
are not in the tensors); anything calm_fast's VAE cannot express is refused by name.
"""
from __future__ import annotations

from calm_fast.codec.mimi import load_pocket_mimi
from calm_fast.codec.vae import VAE, VAEConfig
from calm_fast.errors import ArgumentError, CheckpointError
from calm_fast.model.weights import load_weights

# the tensors of each side, by key prefix (the package's names, which are calm_fast's)
ENCODER_SIDE = ("encoder.", "encoder_transformer.", "downsample.")
DECODER_SIDE = ("decoder.", "decoder_transformer.", "quantizer.", "upsample.")


def _side_config(mc, seanet, tr, name: str, latent_dim: int | None = None) -> VAEConfig:
    """The VAEConfig of one side of the package's MimiConfig ``mc``."""
    bad = []
    if seanet.pad_mode != "constant":
        bad.append(f"SEANet pad_mode {seanet.pad_mode!r}")
    if not (tr.d_model == tr.input_dimension == seanet.dimension
            and tuple(tr.output_dimensions) == (tr.d_model,)):
        bad.append(f"a projected Transformer ({tr.input_dimension} -> {tr.d_model} -> "
                   f"{tuple(tr.output_dimensions)} channels around a "
                   f"{seanet.dimension}-channel SEANet)")
    if tr.max_period != 10_000.0:
        bad.append(f"RoPE max_period {tr.max_period}")
    if seanet.channels != mc.channels:
        bad.append(f"{seanet.channels} SEANet channels for {mc.channels} audio channels")
    if bad:
        raise CheckpointError(f"Mimi {name} side not supported: {'; '.join(bad)}")
    return VAEConfig(
        f"pocket_{name}", sample_rate=mc.sample_rate, frame_rate=mc.frame_rate,
        latent_dim=latent_dim or mc.quantizer.dimension, channels=mc.channels,
        dimension=seanet.dimension,
        n_filters=seanet.n_filters, n_residual_layers=seanet.n_residual_layers,
        ratios=tuple(seanet.ratios), kernel_size=seanet.kernel_size,
        residual_kernel_size=seanet.residual_kernel_size,
        last_kernel_size=seanet.last_kernel_size, dilation_base=seanet.dilation_base,
        compress=seanet.compress, encoder_layers=tr.num_layers, decoder_layers=tr.num_layers,
        num_heads=tr.num_heads, ffn_mult=tr.dim_feedforward / tr.d_model,
        layer_scale=tr.layer_scale, context=tr.context)


class OneSideVAE(VAE):
    """A VAE of which one side only (``side``: "encoder" or "decoder") holds the
    checkpoint's weights: a call that would run the other side is refused, so that a caller
    given the wrong one (e.g. encoding a voice prompt with the decoding VAE) is told instead
    of getting latents from random weights."""

    def __init__(self, cfg: VAEConfig, side: str):
        super().__init__(cfg)
        self.side = side

    def _need(self, side: str) -> None:
        if self.side != side:
            raise ArgumentError(f"this VAE holds only the {self.side} side of a Pocket TTS Mimi "
                                f"whose sides have different shapes: use its {side} VAE "
                                f"(calm_fast.runtime.pocket_codec.load_pocket_codecs)")

    def encode(self, *a, **kw):
        self._need("encoder")
        return super().encode(*a, **kw)

    def posterior(self, *a, **kw):
        self._need("encoder")
        return super().posterior(*a, **kw)

    def decode(self, *a, **kw):
        self._need("decoder")
        return super().decode(*a, **kw)

    def forward(self, *a, **kw):
        raise ArgumentError("a one-sided VAE cannot run its training pass (encode + decode)")


def _load_side(sd: dict, cfg: VAEConfig, side: tuple, what: str) -> VAE:
    vae = OneSideVAE(cfg, "encoder" if side is ENCODER_SIDE else "decoder")
    own = vae.state_dict()
    mine = {k: v for k, v in sd.items() if k.startswith(side)}
    # the other side keeps the new VAE's own tensors: OneSideVAE refuses to run it
    mine.update({k: v for k, v in own.items() if not k.startswith(side)})
    load_weights(vae, mine, what)
    return vae.eval()


def load_pocket_codecs(sd: dict, mimi_config) -> tuple[VAE, VAE]:
    """(encoding VAE, decoding VAE) of a Pocket TTS Mimi state dict and its ``MimiConfig``;
    the same VAE twice when the two sides share their shapes."""
    mc = mimi_config
    if mc.decoder_seanet is None and mc.decoder_transformer is None \
            and mc.outer_dim in (None, mc.seanet.dimension) \
            and mc.inner_dim in (None, mc.quantizer.dimension):
        vae = load_pocket_mimi(sd)
        return vae, vae
    # inner_dim: the encoder's output channels, which only the voice conditioning reads
    # (english_2026-01: 512, its LM's speaker projection takes them); the LM's latents are
    # the quantizer's
    enc = _side_config(mc, mc.seanet, mc.transformer, "encoder", mc.inner_dim)
    dec = _side_config(mc, mc.decoder_seanet or mc.seanet,
                       mc.decoder_transformer or mc.transformer, "decoder")
    # the decoder side reads the latents through a quantizer and an upsampler of
    # outer_dim (else its SEANet's) channels, which calm_fast's VAE ties to its SEANet's
    width = mc.outer_dim or dec.dimension
    if not mc.quantizer.output_dimension == width == dec.dimension:
        raise CheckpointError(f"Mimi decoder side not supported: quantizer output "
                              f"{mc.quantizer.output_dimension}, outer_dim {mc.outer_dim} and "
                              f"decoder SEANet {dec.dimension} channels differ")
    return (_load_side(sd, enc, ENCODER_SIDE, "Pocket TTS Mimi checkpoint (encoder side)"),
            _load_side(sd, dec, DECODER_SIDE, "Pocket TTS Mimi checkpoint (decoder side)"))
