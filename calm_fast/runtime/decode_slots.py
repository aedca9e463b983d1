"""Streaming VAE decoding for streams that join and leave at any frame, batched.

``VAEState`` advances a fixed batch together. The engine's streams start and stop at
different frames, so ``DecodeSlots`` keeps every decoder state tensor with one row per
slot, gathers the rows of the streams that made a frame, decodes them as ONE batch, and
scatters the new state back. Decoder states start at zero (constant-padded causal convs,
empty transposed-conv tails, the iSTFT family's empty overlap-add tail), so a fresh slot is
a zeroed row, and one batch may mix new and old streams. On the fast path (``fast.vae.applies``) the decoder's windowed Transformer
keeps one paged-cache stream per slot, each at its own position; on the reference path its
K/V rows are state tensors like the convs'.

    slots = DecodeSlots(vae, 64)
    slots.open(3)                                   # stream joins
    wav = slots.decode([3, 7], latents[2, 1, C])    # [2, channels, frame_size]
    slots.close(3)                                  # stream leaves
"""
from __future__ import annotations

import torch

from calm_fast.codec.vae import VAE
from calm_fast.fast import vae as fast_vae


class DecodeSlots:
    def __init__(self, vae: VAE, slots: int, max_frames_per_call: int = 1,
                 block_size: int = 16):
        if slots < 1 or max_frames_per_call < 1:
            raise ValueError(f"need slots >= 1 and max_frames_per_call >= 1, got {slots}, "
                             f"{max_frames_per_call}")
        self.vae, self.n, self.max_frames = vae, slots, max_frames_per_call
        self.tensors: dict = {}  # module -> [slots, ...] state rows
        p = next(vae.parameters())
        self.cache = None
        if fast_vae.applies(vae):
            self.cache = fast_vae.open_window_cache(
                vae.decoder_transformer, slots, max_frames_per_call * vae.cfg.stride,
                dtype=p.dtype, device=p.device)
        self.ids: list[int | None] = [None] * slots

    def open(self, slot: int) -> None:
        """Start a new stream in ``slot`` (a slot still open is reset)."""
        if not 0 <= slot < self.n:
            raise IndexError(f"slot {slot} outside [0, {self.n})")
        if self.ids[slot] is not None and self.cache is not None:
            self.cache.free(self.ids[slot])
        self.ids[slot] = self.cache.new_stream() if self.cache is not None else slot
        for t in self.tensors.values():
            t[slot].zero_()

    def close(self, slot: int) -> None:
        if self.ids[slot] is not None:
            if self.cache is not None:
                self.cache.free(self.ids[slot])
            self.ids[slot] = None

    @property
    def open_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.ids) if s is not None]

    @torch.no_grad()
    def decode(self, slots: list[int], latents: torch.Tensor) -> torch.Tensor:
        """latents [len(slots), frames, C] (raw, de-normalised) of open slots -> audio
        [len(slots), channels, frames * frame_size]."""
        if len(set(slots)) != len(slots) or any(self.ids[s] is None for s in slots):
            raise ValueError(f"decode needs distinct open slots, got {slots}")
        if latents.shape[0] != len(slots) or latents.shape[1] > self.max_frames:
            raise ValueError(f"latents must be [{len(slots)}, <= {self.max_frames}, C], got "
                             f"{tuple(latents.shape)}")
        idx = torch.tensor(slots, device=latents.device)
        st = self.vae.init_state(len(slots))  # VAEState, or the iSTFT family's state
        st.tensors = {m: t[idx] for m, t in self.tensors.items()}
        if self.cache is not None:
            st.caches[self.vae.decoder_transformer] = (self.cache,
                                                       [self.ids[s] for s in slots])
            wav = fast_vae.decode(self.vae, latents, st)
        else:  # the reference, or the iSTFT family's own fast path
            wav = fast_vae.decode(self.vae, latents, st)
        for m, t in st.tensors.items():
            if m not in self.tensors:  # first call: rows of the other slots start at zero
                self.tensors[m] = t.new_zeros(self.n, *t.shape[1:])
            self.tensors[m][idx] = t
        return wav
