"""Test and benchmark support (not shipped): the pocket-tts package's own models, built
offline with random weights, as the peer of the parity tests and same-run benchmarks."""
import os
from pathlib import Path

import torch
import yaml

from calm_fast.data.text import collect
from calm_fast.model.conditioning import SentencePieceTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the package must never reach for the hub


def random_tts_model(workdir, config: str = "english", seed: int = 0, vocab_size: int = 4000,
                     texts=None, **load_kw):
    """The pocket-tts package's own ``TTSModel`` for a packaged config, with random weights
    and no download (weights live on the hub): a SentencePiece model is trained on our own
    text (``texts``, default: the dataset builders' sentences) in ``workdir``, the config is pointed at it and stripped of weight paths, and every
    flow-LM weight is perturbed (the published init zeroes the head's modulations and the
    speaker projection). For parity tests and same-run benchmarks against the peer.
    ``load_kw`` goes to ``TTSModel.load_model`` (eos_threshold, quantize, temp...).
    ``config``: a packaged config's name, or the path of a YAML file in the same format
    (e.g. a packaged config doctored to stand for one a later release could add)."""
    from pocket_tts import TTSModel
    from pocket_tts.utils.config import CONFIGS_DIR

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spm = workdir / f"spm{vocab_size}.model"
    if not spm.exists():
        SentencePieceTokenizer.train(texts if texts is not None else collect(),
                                     vocab_size=vocab_size).save(spm)
    n = SentencePieceTokenizer(spm).vocab_size
    src = Path(config) if str(config).endswith(".yaml") else CONFIGS_DIR / f"{config}.yaml"
    cfg = yaml.safe_load(src.read_text())
    config = src.stem
    cfg["weights_path"] = cfg["weights_path_without_voice_cloning"] = None
    cfg["flow_lm"].pop("weights_path", None)
    cfg["mimi"].pop("weights_path", None)
    # the package wants the table exactly as large as the vocabulary
    cfg["flow_lm"]["lookup_table"].update(tokenizer="sentencepiece", n_bins=n,
                                          tokenizer_path=str(spm))
    path = workdir / f"{config}_random.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torch.manual_seed(seed)
    model = TTSModel.load_model(config=str(path), **load_kw)
    with torch.no_grad():
        for p in model.flow_lm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def voice_prompt(seconds: float = 2.0) -> torch.Tensor:
    """A 24 kHz voice prompt [1, samples] (a modulated tone with a little noise): the
    drop-in tests' shared prompt, the same samples every time."""
    g = torch.Generator().manual_seed(3)
    t = torch.arange(round(24_000 * seconds)) / 24_000
    wav = 0.3 * torch.sin(2 * torch.pi * 180 * t) * (1 + 0.5 * torch.sin(5 * t))
    return (wav + 0.01 * torch.randn(wav.shape, generator=g))[None]
