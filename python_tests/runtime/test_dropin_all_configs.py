"""calm_fast.accelerate on EVERY config the installed pocket-tts package ships (the list is
read from its config folder when the tests are collected, so the configs of a later release
are exercised too): random weights of each config's own shapes (pocket_fixtures), and the
same seed, text and voice prompt must give the package's audio through ``generate_audio``
and ``generate_audio_stream`` (chunks concatenated), leaving torch's global RNG where the
package leaves it. The package (4.0.1) has no batched call: request i of
``generate_audio_batch(seed=s)`` must give the package's ``generate_audio`` under seed s + i,
and leave the global RNG alone.

The configs of more than 8 layers (the 24-layer ones) are heavy on a CPU (~30 s each): by
default one of them runs (``english_2026-09_24l``, else the first), and the others are
covered as a group: ``test_each_heavy_config_is_a_tested_architecture_and_text_handling``
checks that each one has exactly the representative's architecture (every ``flow_lm`` and
``mimi`` field but the tokenizer file) and exactly its 6-layer sibling's text handling and
sampling (every other field but the weight files), and both of those run here in full.
``CALM_FAST_ALL_CONFIGS=1`` runs them all anyway. A config that calm_fast does not run must be refused in one line: the known ones
are in REFUSED, and a new config refused fails its test with accelerate()'s line.
"""
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.peer

try:
    from pocket_tts.utils.config import CONFIGS_DIR
except ImportError:  # the peer extra is not installed: nothing to compare with
    CONFIGS_DIR = None

ALL = os.environ.get("CALM_FAST_ALL_CONFIGS", "0") not in ("", "0")
HEAVY_LAYERS = 8  # more layers than this: heavy (the 24-layer configs)
REPRESENTATIVE = "english_2026-09_24l"
# config -> the words of its one-line refusal (why: see the README's drop-in section)
REFUSED: dict[str, str] = {}  # none in pocket-tts 4.0.1 (english_2026-01, without a BOS
# row before the voice, runs since CALMConfig.bos_before_voice)
TEXTS = ["Hello world.", "The quick brown fox."]
WORDS = ("hello world the quick brown fox jumps over a lazy dog and then some more text "
         "to say out loud in a sentence with numbers one two three").split()


def _configs():
    if CONFIGS_DIR is None:
        return []
    out = []
    for p in sorted(Path(CONFIGS_DIR).glob("*.yaml")):
        layers = yaml.safe_load(p.read_text())["flow_lm"]["transformer"]["num_layers"]
        out.append((p.stem, layers > HEAVY_LAYERS))
    return out


def _heavy():
    """(the heavy config run in full, the heavy configs covered by the group test)."""
    heavy = [name for name, h in _configs() if h]
    rep = REPRESENTATIVE if REPRESENTATIVE in heavy else (heavy[0] if heavy else None)
    return rep, [n for n in heavy if n != rep]


def _params():
    configs = _configs()
    rep = _heavy()[0]
    marks = pytest.mark.skip(reason="heavy (24-layer) config, covered by its group test: "
                                    "CALM_FAST_ALL_CONFIGS=1 runs it")
    return [pytest.param(name, marks=() if not h or ALL or name == rep else marks, id=name)
            for name, h in configs]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    pytest.importorskip("pocket_tts")
    return tmp_path_factory.mktemp("configs")  # one tokenizer, trained once, for every config


@pytest.fixture(scope="module")
def voice():
    from pocket_fixtures import voice_prompt

    return voice_prompt(1.0)


def _peer(workdir, config):
    from pocket_fixtures import random_tts_model

    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    model = random_tts_model(workdir, config=config, vocab_size=60, texts=lines)
    with torch.no_grad():  # EOS after a few frames, not at once (nor never)
        model.flow_lm.out_eos.bias.fill_(model.eos_threshold + 1.0)
    return model


def _refusal(peer):
    """accelerate()'s CheckpointError for ``peer``, checked to be one line."""
    import calm_fast
    from calm_fast.errors import CheckpointError

    with pytest.raises(CheckpointError) as e:
        calm_fast.accelerate(peer, max_streams=2, cache_mb=32)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def _same(got, want, atol, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("config", _params())
def test_every_packaged_config_gives_the_package_audio(workdir, voice, config):
    import calm_fast
    from calm_fast.errors import CalmFastError

    peer = _peer(workdir, config)
    if config in REFUSED:
        assert REFUSED[config] in _refusal(peer)
        return
    try:
        fast = calm_fast.accelerate(peer, max_streams=2, cache_mb=32)
    except CalmFastError as e:  # e.g. a config of a later release with a new kind of part
        pytest.fail(f"{config} is refused by calm_fast.accelerate(): {e}", pytrace=False)
    text = TEXTS[0]
    # generate_audio, from voice states made beforehand (as a server keeps them)
    peer_state = peer.get_state_for_audio_prompt(voice)
    state = fast.get_state_for_audio_prompt(voice)
    torch.manual_seed(11)
    want = peer.generate_audio(peer_state, text)
    rng = torch.get_rng_state()
    assert want.shape[0] > 6 * 1920 and want.abs().max() > 1e-3  # not vacuous
    torch.manual_seed(11)
    _same(fast.generate_audio(state, text), want, 1e-6, "generate_audio")
    assert torch.equal(torch.get_rng_state(), rng), "generate_audio: RNG"
    # generate_audio_stream, chunks concatenated, the voice prompted under the same seed
    # (the package draws once after a prompt); the package's own stream is the reference
    torch.manual_seed(11)
    want_s = torch.cat(list(peer.generate_audio_stream(peer.get_state_for_audio_prompt(voice),
                                                        text)))
    rng = torch.get_rng_state()
    torch.manual_seed(11)
    chunks = list(fast.generate_audio_stream(fast.get_state_for_audio_prompt(voice), text))
    assert len(chunks) > 1
    _same(torch.cat(chunks), want_s, 1e-6, "generate_audio_stream")
    assert torch.equal(torch.get_rng_state(), rng), "generate_audio_stream: RNG"
    # the batched call: request i as the package's generate_audio from the same voice
    # state under seed 11 + i (request 0: ``want``)
    torch.manual_seed(12)
    want_1 = peer.generate_audio(peer_state, TEXTS[1])
    rng = torch.get_rng_state()
    batch = fast.generate_audio_batch(state, TEXTS, seed=11)
    assert torch.equal(torch.get_rng_state(), rng), "generate_audio_batch: RNG"
    _same(batch[0], want, 1e-5, "generate_audio_batch[0]")  # two streams: batched sums
    _same(batch[1], want_1, 1e-5, "generate_audio_batch[1]")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


@pytest.mark.skipif(CONFIGS_DIR is None, reason="the pocket-tts package is not installed")
@pytest.mark.parametrize("config", _heavy()[1])
def test_each_heavy_config_is_a_tested_architecture_and_text_handling(config):
    """A heavy config the default run skips gives the package's audio because both halves
    of it are tested above: its model (every ``flow_lm``/``mimi`` field but the tokenizer
    file, which the fixture trains anyway) is the representative's, and everything else
    (the package's text handling, default temperature; not the weight files) is its
    6-layer sibling's, which runs in full. A later heavy config that is neither fails here:
    run it with CALM_FAST_ALL_CONFIGS=1 and make it the representative of a new group."""
    rep = _heavy()[0]
    load = lambda name: _flat(yaml.safe_load((Path(CONFIGS_DIR) / f"{name}.yaml")  # noqa: E731
                                             .read_text()))
    me, arch_ref = load(config), load(rep)
    sibling = config.replace("_24l", "")
    light = {n for n, h in _configs() if not h}
    assert sibling in light, f"{config}: no 6-layer sibling {sibling!r} runs in full"
    text_ref = load(sibling)

    def arch(k):
        return k.startswith(("flow_lm.", "mimi.")) and not k.endswith("tokenizer_path")

    keys = set(me) | set(arch_ref) | set(text_ref)
    model_diff = {k: (me.get(k), arch_ref.get(k)) for k in keys
                  if arch(k) and me.get(k) != arch_ref.get(k)}
    assert not model_diff, f"{config} is not {rep}'s architecture: {model_diff}"
    text_diff = {k: (me.get(k), text_ref.get(k)) for k in keys
                 if not arch(k) and "weights_path" not in k and not k.endswith("tokenizer_path")
                 and me.get(k) != text_ref.get(k)}
    assert not text_diff, f"{config} does not handle text as {sibling}: {text_diff}"
    # the comparison is not vacuous: the group shares a depth the light configs do not have
    assert me["flow_lm.transformer.num_layers"] > HEAVY_LAYERS


def _doctored(workdir, edit, name):
    src = yaml.safe_load((Path(CONFIGS_DIR) / "english_2m_2026-10.yaml").read_text())
    edit(src)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(src))
    return _peer(workdir, str(path))


@pytest.mark.skipif(CONFIGS_DIR is None, reason="the pocket-tts package is not installed")
def test_a_later_config_that_calm_fast_cannot_run_is_refused_in_one_line(workdir):
    """Packaged configs doctored as a later release could change them (the package runs
    both): a flow-matching head, and a Mimi decoder side with another RoPE period."""
    peer = _doctored(workdir, lambda c: c["flow_lm"]["flow"].update(type="flow_matching"),
                     "later_flow_matching")
    assert "flow type 'flow_matching' are not supported" in _refusal(peer)

    def rope(c):
        c["mimi"]["decoder_transformer"]["max_period"] = 5000.0
    assert "Mimi decoder side not supported: RoPE max_period" in _refusal(
        _doctored(workdir, rope, "later_rope"))


def test_the_config_list_is_the_package_folder():
    """The parametrisation above is the package's folder itself, not a list of names."""
    if CONFIGS_DIR is None:
        pytest.skip("the pocket-tts package is not installed")
    names = [n for n, _ in _configs()]
    assert names == sorted(p.stem for p in Path(CONFIGS_DIR).glob("*.yaml")) and names
    assert set(REFUSED) <= set(names)  # a refusal of a config no longer shipped: drop it
