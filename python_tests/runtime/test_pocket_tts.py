"""Pocket TTS parity: the package's own FlowLMModel, built from its English YAML with random
weights (no download: the LUT is built without the hub tokenizer), exported to safetensors,
loaded into calm_fast; backbone, head and generated latents must match."""
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from calm_fast.errors import CheckpointError
from calm_fast.runtime.pocket_tts import (config_from_state_dict, load_pocket_flow_lm, read_state_dict)
from calm_fast.model.config import preset
from calm_fast.runtime.generate import CALMGenerator, Request

pytestmark = pytest.mark.peer


class _LUT(nn.Module):
    """The LUTConditioner's tensors, without its tokenizer download."""

    def __init__(self, n_bins, dim):
        super().__init__()
        self.embed = nn.Embedding(n_bins + 1, dim)

    def forward(self, tokens):
        return self.embed(tokens)


@pytest.fixture(scope="module")
def peer():
    pytest.importorskip("pocket_tts")
    from importlib.resources import files

    from pocket_tts.models.flow_lm import FlowLMModel
    from pocket_tts.modules.mlp import SimpleMLPAdaLN
    from pocket_tts.modules.stateful_module import StatefulModule
    from pocket_tts.modules.transformer import StreamingTransformer
    from pocket_tts.utils.config import load_config

    cfg = load_config(files("pocket_tts") / "config" / "english.yaml")
    f = cfg.flow_lm
    ldim = cfg.mimi.quantizer.dimension
    torch.manual_seed(0)
    model = FlowLMModel(
        _LUT(f.lookup_table.n_bins, f.lookup_table.dim),
        SimpleMLPAdaLN.from_pydantic_config(f, ldim, f.transformer.d_model),
        StreamingTransformer.from_pydantic_config(f.transformer), dim=f.transformer.d_model,
        ldim=ldim, insert_bos_before_voice=f.insert_bos_before_voice, flow_type=f.flow.type)
    model.speaker_proj_weight = nn.Parameter(torch.zeros(f.transformer.d_model, ldim))
    with torch.no_grad():  # the published init zeroes the head's modulations: perturb all
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model.emb_std.uniform_(0.5, 2.0)
        model.emb_mean.normal_()
    for name, mod in model.named_modules():
        if isinstance(mod, StatefulModule):
            mod._module_absolute_name = name
    return model.eval()


@pytest.fixture(scope="module")
def ours(peer, tmp_path_factory):
    path = tmp_path_factory.mktemp("pocket") / "flow_lm.safetensors"
    save_file({f"flow_lm.{k}": v.contiguous() for k, v in peer.state_dict().items()}, str(path))
    return load_pocket_flow_lm(path)


def test_config_is_the_pocket_preset(ours):
    want = preset("pocket")
    assert ours.cfg.backbone == want.backbone and ours.cfg.head == want.head
    assert ours.cfg.latent_dim == want.latent_dim and ours.cfg.text_bins == want.text_bins


def test_backbone_and_head_match(peer, ours):
    torch.manual_seed(1)
    prefix = torch.randn(1, 9, 1024)
    lat = torch.randn(1, 6, 32)
    seq = torch.cat([torch.full((1, 1, 32), float("nan")), lat[:, :-1]], 1)
    with torch.no_grad():
        inp = peer.input_linear(torch.where(torch.isnan(seq), peer.bos_emb, seq))
        want = peer.backbone(inp, prefix, seq, model_state=None)
        got, eos = ours(lat, prefix)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(eos, peer.out_eos(want)[..., 0], rtol=1e-4, atol=1e-4)
        c, x = got[0], torch.randn(6, 32)
        s, t = torch.rand(6, 1), torch.rand(6, 1)
        torch.testing.assert_close(ours.flow_net(c, s, t, x), peer.flow_net(c, s, t, x),
                                   rtol=1e-4, atol=1e-5)


def test_generated_latents_match_for_the_same_seed(peer, ours):
    from pocket_tts.modules.stateful_module import increment_steps, init_states

    torch.manual_seed(2)
    voice = torch.randn(12, 32)
    tokens = torch.randint(0, 4000, (7,))
    with torch.no_grad():
        prefix = ours.prefix(voice=voice, tokens=tokens)
        # the package's own layout: [bos_before_voice, voice @ W^T, text] then BOS
        text = peer.conditioner(tokens[None])
        vpre = torch.cat([peer.bos_before_voice, voice[None] @ peer.speaker_proj_weight.t()], 1)
        torch.testing.assert_close(prefix[None], torch.cat([vpre, text], 1))
        frames, seed = 6, 1234
        state = init_states(peer, batch_size=1, sequence_length=64)
        torch.manual_seed(seed)
        seq = torch.full((1, 1, 32), float("nan"))
        want = []
        lat, _ = peer._sample_next_latent(seq, prefix[None], state, 1, 0.7, None, -4.0)
        increment_steps(peer, state, prefix.shape[0] + 1)
        want.append(lat)
        for _ in range(frames - 1):
            lat, _ = peer._sample_next_latent(want[-1][:, None], prefix[None, :0], state, 1,
                                              0.7, None, -4.0)
            increment_steps(peer, state, 1)
            want.append(lat)
    got = CALMGenerator(ours).generate([Request(prefix, frames, temperature=0.7, seed=seed,
                                                eos_threshold=None)])[0]
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-4)


def test_training_export_names_are_mapped(peer):
    sd = peer.state_dict()
    raw = {("condition_provider.conditioners.transcript_in_segment.embed.weight"
            if k == "conditioner.embed.weight" else
            "fuser.padding_value" if k == "bos_before_voice" else
            "condition_provider.conditioners.speaker_wavs.output_proj.weight"
            if k == "speaker_proj_weight" else
            k.replace(".self_attn.in_proj.weight", ".self_attn.in_proj_weight")): v
           for k, v in sd.items()}
    raw["num_ema_updates"] = torch.tensor(3)
    assert set(read_state_dict(raw)) == set(sd)


def test_bad_checkpoints_name_their_keys(peer, tmp_path):
    sd = dict(peer.state_dict())
    del sd["out_eos.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys \['out_eos.bias'\].*unexpected keys \['extra.weight'\]"):
        load_pocket_flow_lm(sd, config=config_from_state_dict(peer.state_dict()))
    sd = dict(peer.state_dict())
    sd["out_norm.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match="wrong shapes.*out_norm.weight"):
        load_pocket_flow_lm(sd, config=config_from_state_dict(peer.state_dict()))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_pocket_flow_lm(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_pocket_flow_lm(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="not a Pocket TTS flow-LM"):
        load_pocket_flow_lm({"foo": torch.zeros(1)})
    nan = dict(peer.state_dict())
    nan["bos_emb"] = torch.full((32,), math.nan)
    with pytest.raises(CheckpointError, match="NaN"):
        load_pocket_flow_lm(nan)


@pytest.mark.parametrize("flow_type", ["drifting", "pointwise"])
def test_one_step_heads_map_exactly(peer, flow_type):
    """The package's time-free heads (drifting: x = F(c, noise); pointwise: noise + F) load as
    one-step heads of calm_fast's kinds and sample the package's latent from the same noise."""
    from pocket_tts.models.flow_lm import drifting_decode, pointwise_decode
    from pocket_tts.modules.mlp import SimpleMLPAdaLN

    from calm_fast.model.sampling import consistency_sample, lsd_sample, module_head

    torch.manual_seed(3)
    head = SimpleMLPAdaLN(32, 64, 32, 1024, 2, num_time_conds=0)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v for k, v in peer.state_dict().items() if not k.startswith("flow_net.")}
    sd.update({f"flow_net.{k}": v for k, v in head.state_dict().items()})
    with pytest.raises(CheckpointError, match="flow type"):
        load_pocket_flow_lm(sd)  # the weights cannot tell drifting from pointwise
    ours = load_pocket_flow_lm(sd, flow_type=flow_type)
    c, noise = torch.randn(5, 1024), torch.randn(5, 32)
    with torch.no_grad():
        decode = drifting_decode if flow_type == "drifting" else pointwise_decode
        want = decode(lambda *a: head(c, *a), noise)
        F = module_head(ours.flow_net)
        got = (consistency_sample(F, c, noise) if ours.cfg.head.kind == "consistency"
               else lsd_sample(F, c, noise))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
