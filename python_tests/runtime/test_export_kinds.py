"""Exports of every model kind: the iSTFT VAE family, half-precision storage, the phoneme
tokenizer, and the errors for the wrong kind."""
import pytest
import torch

from calm_fast.codec.istft import ISTFTVAE, ISTFTVAEConfig
from calm_fast.errors import CheckpointError
from calm_fast.model.calm import CALM
from calm_fast.model.config import preset
from calm_fast.model.phonemes import PhonemeTokenizer
from calm_fast.runtime.export import export_model, load_model


def test_istft_vae_round_trips_in_half_precision(tmp_path):
    torch.manual_seed(0)
    v = ISTFTVAE(ISTFTVAEConfig(enc_dim=32, dec_dim=32, dec_blocks=1, enc_blocks_low=1,
                                mlp_mult=2)).eval()
    p = export_model(tmp_path / "v.safetensors", v, dtype=torch.float16)
    w = load_model(p, expect="vae")
    assert isinstance(w, ISTFTVAE) and w.cfg == v.cfg
    sd, sd2 = v.state_dict(), w.state_dict()
    assert all(sd2[k].dtype == torch.float32 for k in sd2)
    assert max((sd[k] - sd2[k]).abs().max().item() for k in sd) < 1e-2
    with pytest.raises(CheckpointError, match="holds a istft_vae model, expected a calm"):
        load_model(p, expect="calm")


def test_phoneme_tokenizer_and_voice_crop_survive_export(tmp_path):
    cfg = preset("tiny").with_(text_bins=PhonemeTokenizer.vocab_size, max_voice_frames=3)
    m = CALM(cfg, PhonemeTokenizer()).eval()
    m2 = load_model(export_model(tmp_path / "m.safetensors", m), expect="calm")
    assert isinstance(m2.conditioner.tokenizer, PhonemeTokenizer)
    assert m2.cfg.max_voice_frames == 3
    v = torch.randn(10, cfg.latent_dim)
    # the prompt is cut to the frames the model was trained on
    assert torch.equal(m2.prefix(text="hi", voice=v), m2.prefix(text="hi", voice=v[:3]))
    assert m2.prefix(text="hi", voice=v).shape[0] == m2.prefix(text="hi").shape[0] + 3
