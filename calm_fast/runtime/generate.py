"""Batched, streaming generation of latents from a CALM model: one batch per call.

``stream()`` runs a list of requests as one batch of frame steps on the generation core
(``runtime.scheduler.Scheduler``) and yields every step's frames as they are made;
``generate()`` collects them. Each request draws its noise from its own generator
(``seed``), so its frames do not depend on what else is in the batch.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from calm_fast.errors import ArgumentError
from calm_fast.runtime.scheduler import Request, Scheduler, StepOutput, Stream  # noqa: F401


class CALMGenerator(Scheduler):
    """Generation over the fast paths, with the weights of a CALM module, one batch of
    requests per call (a Scheduler sized to the call on CPU unless ``num_blocks`` is
    given).

    head_steps: LSD / consistency steps per frame. int8: int8 weights for the backbone and
    head (CPU). device: where the cache and the frame compute live; on CUDA each frame is a
    CUDA-graph replay (frame_step.FrameStep) and ``dtype`` may be bf16/fp16; there the
    cache (``num_blocks``, required) and the captured graphs are kept across calls. The
    weights are packed once here: build a new generator after training."""

    # -- the loop -------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(self, requests: list[Request]) -> Iterator[StepOutput]:
        requests = list(requests)
        if not requests:
            raise ArgumentError("no requests")
        for i, r in enumerate(requests):
            self.check(i, r)
        need = sum(self.blocks_for(r) for r in requests)
        nstreams = sum(2 if r.cfg_scale != 1 else 1 for r in requests)
        self.setup(need, nstreams, len(requests))
        streams = []
        try:
            for i, r in enumerate(requests):
                streams.append(self.admit(i, r, i))
        except BaseException:  # a kept (GPU) cache must not keep the ones already started
            for s in streams:
                self.release(s)
            raise
        try:
            step = 0
            while streams:
                yield self.step(streams, step)
                step += 1
        finally:
            for s in streams:  # the caller stopped early: release what is still held
                self.release(s)

    def generate(self, requests: list[Request]) -> list[torch.Tensor]:
        """All frames of every request: a list of [T_i, C] normalised latents. A request
        that ended with an error (``StepOutput.errors``) raises it once every other request
        has finished (use ``stream()`` to keep the others' frames)."""
        frames = [[] for _ in requests]
        errors = {}
        for out in self.stream(requests):
            for i, lat in zip(out.ids, out.latents):
                frames[i].append(lat)
            errors.update(out.errors)
        if errors:
            raise errors[min(errors)]
        C = self.cfg.latent_dim
        return [torch.stack(f).float().cpu() if f else torch.empty(0, C) for f in frames]
