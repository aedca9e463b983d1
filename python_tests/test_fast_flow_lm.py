"""Fast flow-LM frame step vs the published pocket-tts FlowLMModel (random weights)."""
import pytest
import torch
import torch.nn as nn

from calm_fast.fast_flow_lm import FastFlowLM

pytestmark = pytest.mark.peer


def build_peer(d=64, heads=4, layers=2, ldim=8):
    flow_lm = pytest.importorskip("pocket_tts.models.flow_lm")
    from pocket_tts.modules.mlp import SimpleMLPAdaLN
    from pocket_tts.modules.stateful_module import StatefulModule
    from pocket_tts.modules.transformer import StreamingTransformer

    torch.manual_seed(0)
    tr = StreamingTransformer(d_model=d, num_heads=heads, num_layers=layers,
                              dim_feedforward=4 * d)
    head = SimpleMLPAdaLN(ldim, 32, ldim, d, 2, num_time_conds=2)
    # the conditioner is not used by the frame step: text arrives as embeddings
    model = flow_lm.FlowLMModel(nn.Identity(), head, tr, dim=d, ldim=ldim).eval()
    with torch.no_grad():
        for p in model.parameters():  # the published init zeroes the head's adaLN
            p.add_(0.05 * torch.randn_like(p))
    for name, mod in model.named_modules():
        if isinstance(mod, StatefulModule):
            mod._module_absolute_name = name
    return model


def test_frames_equal_the_published_flow_lm():
    from pocket_tts.modules.stateful_module import increment_steps, init_states

    model = build_peer()
    fast = FastFlowLM.from_state_dict(model.state_dict(), heads=4)
    prefix = torch.randn(1, 5, 64)
    state = init_states(model, batch_size=1, sequence_length=64)
    cache = fast.make_cache(32, 4)
    s = cache.new_stream()
    seq = torch.full((1, 1, 8), float("nan"))  # BOS
    with torch.no_grad():
        want = []
        torch.manual_seed(123)
        # prefix and BOS frame in one call, as the package does for the first frame
        lat, eos = model._sample_next_latent(seq, prefix, state, 1, 0.7, None, -4.0)
        increment_steps(model, state, 6)
        want.append(lat)
        for _ in range(4):
            lat, eos = model._sample_next_latent(want[-1][:, None], prefix[:, :0], state, 1,
                                                 0.7, None, -4.0)
            increment_steps(model, state, 1)
            want.append(lat)
    torch.manual_seed(123)
    fast.prefill(cache, s, prefix[0])
    got, prev = [], torch.full((1, 8), float("nan"))
    for _ in range(5):
        prev, _, _ = fast.step(cache, [s], prev)
        got.append(prev)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_batched_streams_with_own_generators_equal_single_runs():
    model = build_peer()
    fast = FastFlowLM.from_state_dict(model.state_dict(), heads=4)
    prefixes = [torch.randn(n, 64) for n in (3, 7)]

    def run(indices):
        cache = fast.make_cache(64, 4)
        ids = [cache.new_stream() for _ in indices]
        for sid, i in zip(ids, indices):
            fast.prefill(cache, sid, prefixes[i])
        gens = [torch.Generator().manual_seed(10 + i) for i in indices]
        prev = torch.full((len(ids), 8), float("nan"))
        frames = []
        for _ in range(4):
            prev, _, _ = fast.step(cache, ids, prev, generators=gens)
            frames.append(prev)
        return torch.stack(frames, 1)

    both = run([0, 1])
    torch.testing.assert_close(both[0], run([0])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], run([1])[0], rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    model = build_peer()
    sd = model.state_dict()
    with pytest.raises(KeyError, match="missing \\['bos_emb'\\]"):
        FastFlowLM.from_state_dict({k: v for k, v in sd.items() if k != "bos_emb"}, heads=4)
    fast = FastFlowLM.from_state_dict(sd, heads=4)
    cache = fast.make_cache(8, 4)
    s = cache.new_stream()
    with pytest.raises(ValueError, match="NaN"):
        fast.prefill(cache, s, torch.full((2, 64), float("nan")))
    with pytest.raises(ValueError, match="prefix must be"):
        fast.prefill(cache, s, torch.randn(2, 32))
    with pytest.raises(ValueError, match=r"latents must be \[1, 8\]"):
        fast.step(cache, [s], torch.randn(1, 4))
    with pytest.raises(ValueError, match="generators"):
        fast.step(cache, [s], torch.randn(1, 8), generators=[])
