"""Dense re-computation of generation with the nn.Module model: the oracle for the paged,
batched, fused generator (same per-request noise stream)."""
import torch

from calm_fast.model.sampling import (consistency_sample, gaussian_noise, lsd_sample, module_head)


def perturbed(model, scale=0.05, seed=0):
    """Random weights with the zero-initialised modulations and output layers filled in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        if hasattr(model, "short"):
            model.short.out_proj.weight.normal_(0, 0.05, generator=g)
    return model.eval()


@torch.no_grad()
def dense_generate(model, req, head_steps=1):
    C = model.cfg.latent_dim
    gen = torch.Generator().manual_seed(req.seed)
    frames = [] if req.prompt_latents is None else list(req.prompt_latents)
    null = model.null_prefix() if req.null_prefix is None else req.null_prefix
    F = module_head(model.flow_net)
    out = []
    L = len(frames)
    for s in range(req.max_frames):
        lat = torch.stack(frames + [torch.zeros(C)])[None]
        rows = None
        if req.frame_cond is not None:  # aligned text: added to the generated frames' inputs
            rows = torch.zeros(1, lat.shape[1], model.cfg.backbone.d_model)
            rows[0, L:] = req.frame_cond[:s + 1]
        z = model(lat, req.prefix[None], frame_rows=rows)[0][0, -1:]
        if req.cfg_scale != 1:
            zn = model(lat, null[None])[0][0, -1:]
            z = zn + req.cfg_scale * (z - zn)
        draw = lambda: gaussian_noise([req.temperature], C, generators=[gen])  # noqa: E731
        noise = draw()
        if model.cfg.head.kind == "lsd":
            x = lsd_sample(F, z, noise, head_steps)[0]
        else:
            x = consistency_sample(F, z, noise, head_steps, renoise=draw)[0]
        frames.append(x)
        out.append(x)
    return torch.stack(out)


def ragged_tts_requests(m):
    """Three tiny-TTS requests: no CFG; CFG with a voice; CFG with a prompt (5 backbone
    rows in all, so a bucketed batch pads them to 8)."""
    from calm_fast.runtime.generate import Request

    g = torch.Generator().manual_seed(5)
    return [
        Request(m.prefix(tokens=torch.tensor([1, 2, 3])), 4, temperature=0.7, seed=1,
                eos_threshold=None),
        Request(m.prefix(voice=torch.randn(5, 8, generator=g), tokens=torch.tensor([7])), 6,
                temperature=0.3, cfg_scale=1.5, seed=2, eos_threshold=None),
        Request(m.prefix(tokens=torch.arange(9)), 5, temperature=1.0, cfg_scale=2.0, seed=3,
                prompt_latents=torch.randn(3, 8, generator=g), eos_threshold=None),
    ]
