"""The drop-in: ``calm_fast.accelerate(tts_model)`` for a pocket-tts ``TTSModel`` (this module is
``calm_fast.dropin``; ``calm_fast.accelerate`` is its entry point).

    from pocket_tts import TTSModel
    import calm_fast

    model = calm_fast.accelerate(TTSModel.load_model())
    voice = model.get_state_for_audio_prompt("me.wav")
    audio = model.generate_audio(voice, "Hello world!")          # as the package's call
    many = model.generate_audio_batch(voice, ["One.", "Two."])    # what the package lacks

The package's own text handling (sentence split, punctuation, capitalisation), audio
reading and prompt trimming are called as they are; the flow LM and Mimi run as calm_fast
modules (the same weights) through the engine's fast paths. The package's newer configs map
onto the same modules (calm_fast.runtime.pocket_tts: one-step heads, z_proj, low-rank text
tables, attention wider than the model; calm_fast.runtime.pocket_codec: a Mimi whose
decoder side has its own shapes, which then encodes prompts and decodes frames with two
VAEs). Randomness follows the
package: the noise comes from torch's global generator, in the package's order (one draw
per flow-LM call, the prompting calls included), so ``torch.manual_seed(s)`` before a call
gives the package's output for the same seed, and leaves the global generator where the
package would. ``generate_audio_batch`` gives request i the seed ``seed + i`` instead.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from calm_fast.codec.mimi import load_pocket_mimi
from calm_fast.runtime.pocket_codec import load_pocket_codecs
from calm_fast.runtime.pocket_tts import ONE_STEP_KINDS, load_pocket_flow_lm
from calm_fast.runtime.engine import Engine
from calm_fast import checks
from calm_fast.errors import (ArgumentError, ArgumentTypeError, AudioError, CacheFullError,
                              CheckpointError, MissingFileError)
from calm_fast.runtime.generate import Request
from calm_fast.model.sampling import gaussian_noise


@dataclass
class VoiceState:
    """A voice prompt: the prefix rows [bos_before_voice, voice latents @ W^T] [P, d], and,
    like the package's state (which holds the prompt's KV cache), those rows prefilled once
    in the engine's cache (``shared``), forked by every request that uses the voice; the
    template is dropped when the state is garbage-collected."""

    rows: torch.Tensor
    shared: object = None


class AcceleratedTTS:
    def __init__(self, peer, *, int8: bool = False, max_streams: int = 16,
                 cache_mb: float = 512.0, decode_frames: int = 8, precision: str = "fp32",
                 overlap: bool = True):
        if not hasattr(peer, "flow_lm") or not hasattr(peer, "mimi"):
            raise ArgumentTypeError(f"accelerate() takes a pocket_tts TTSModel, got "
                                    f"{type(peer).__name__}")
        # weights of the LM and its head: fp32 (the package's audio), bf16 or int8
        precision = checks.precision(precision, int8)
        checks.integer("max_streams", max_streams, 1, 4096)  # streams decoded together
        checks.real("cache_mb", cache_mb, 0, 1 << 20, lo_open=True)  # K/V cache size
        checks.integer("decode_frames", decode_frames, 1, 64)  # frames per decoder call
        self.peer = peer
        sd = {k: v.detach().float().cpu() for k, v in peer.flow_lm.state_dict().items()}
        flow_type = getattr(peer.flow_lm, "flow_type", "lsd")
        if flow_type not in ("lsd", *ONE_STEP_KINDS):
            # e.g. flow_matching: Euler steps of a one-time head, which no engine path runs
            raise CheckpointError(f"flow LMs of flow type {flow_type!r} are not supported "
                                  f"(supported: lsd, {', '.join(ONE_STEP_KINDS)})")
        tr = getattr(getattr(getattr(peer, "config", None), "flow_lm", None), "transformer", None)
        # the head count is not in the tensors: the package's config says it
        self.lm = load_pocket_flow_lm(sd, flow_type=flow_type,
                                      num_heads=getattr(tr, "num_heads", None))
        # the package's one-step heads ignore its sampler_decode_steps
        head_steps = 1 if flow_type in ONE_STEP_KINDS else peer.sampler_decode_steps
        msd = {k: v.detach().float().cpu() for k, v in peer.mimi.state_dict().items()}
        config = getattr(peer, "config", None)
        if config is None:
            self.vae = self.encoder = load_pocket_mimi(msd)
        else:
            # newer Mimis decode with their own shapes: voice prompts go through the
            # encoding VAE, frames through the decoding one (the same VAE for older ones)
            self.encoder, self.vae = load_pocket_codecs(msd, config.mimi)
        c = self.lm.cfg.backbone
        block_bytes = 2 * c.num_layers * c.kv_heads * c.head_dim * 4 * 16
        self.engine = Engine(self.lm, num_blocks=max(64, int(cache_mb * 2**20 // block_bytes)),
                             max_streams=max_streams, head_steps=head_steps,
                             precision=precision, vae=self.vae, decode_frames=decode_frames,
                             overlap=overlap)  # the decoder on its own thread and core
        self.sample_rate = peer.sample_rate

    # -- the package's calls ------------------------------------------------------------------
    def _burn_draw(self, gen=None) -> None:
        """The draw the package makes in a prompting call (its sample is thrown away)."""
        gaussian_noise([self.peer.temp], self.lm.cfg.latent_dim,
                       generators=None if gen is None else [gen], clamp=self.peer.noise_clamp)

    @torch.no_grad()
    def get_state_for_audio_prompt(self, audio_conditioning, truncate: bool = False):
        """A VoiceState from an audio file path or a [channels, samples] tensor at the model's
        rate (the package's reading, resampling and end-on-pause trimming)."""
        from pathlib import Path

        from pocket_tts.data.audio import audio_read
        from pocket_tts.data.audio_utils import convert_audio, end_on_pause

        wav = audio_conditioning
        if isinstance(wav, (str, Path)) and str(wav).endswith(".safetensors"):
            return self._exported_voice(Path(wav))
        from pocket_tts.utils.utils import _ORIGINS_OF_PREDEFINED_VOICES
        if isinstance(wav, str) and wav in _ORIGINS_OF_PREDEFINED_VOICES:
            # the package's own rules and lookup (its local Hugging Face cache; offline,
            # HF_HUB_OFFLINE=1 makes a missing voice an error instead of a download)
            return self._exported_voice(self._predefined_voice(wav))
        if isinstance(wav, (str, Path)):
            if not Path(wav).is_file():
                raise AudioError(f"audio prompt {str(wav)!r}: no such file")
            try:
                wav, sr = audio_read(Path(wav))
            except Exception as e:  # the package's reader: libsndfile / PyAV messages
                raise AudioError(f"audio prompt {str(wav)!r} cannot be read as audio: {e}") from e
            if truncate:
                wav = wav[..., :int(30 * sr)]
            wav = convert_audio(wav, sr, self.sample_rate, 1)
        if not isinstance(wav, torch.Tensor):
            raise ArgumentTypeError(f"audio prompt must be a file path or a [channels, samples] "
                                    f"tensor, got {type(wav).__name__}")
        if wav.dim() != 2 or wav.shape[-1] == 0:
            raise ArgumentError(f"audio prompt must be a file or a non-empty [channels, "
                                f"samples] tensor, got shape {tuple(wav.shape)}")
        if not wav.is_floating_point() or not torch.isfinite(wav).all():
            raise ArgumentError("audio prompt must be finite floating-point samples (it holds "
                                "NaN/Inf or is not float)")
        wav = end_on_pause(wav, self.sample_rate)
        lat = self.encoder.encode(self.encoder.pad(wav[None].float()))[0]
        self._burn_draw()  # the package samples once after prompting the voice
        return self._voice(self.lm.prefix(voice=lat).detach())

    def _predefined_voice(self, name: str) -> Path:
        from pocket_tts.models.tts_model import CONFIGS_DIR
        from pocket_tts.utils.utils import download_if_necessary, get_predefined_voice

        p = self.peer
        if getattr(p, "has_custom_weights", False):
            raise ArgumentError(f"predefined voice {name!r} was computed with the released "
                                f"weights, not these: pass the voice as an audio file")
        if p.origin is None or not Path(p.origin).is_relative_to(CONFIGS_DIR):
            raise ArgumentError(f"predefined voice {name!r} needs a model loaded from one of "
                                f"the package's language configs (origin: {p.origin})")
        return Path(download_if_necessary(get_predefined_voice(language=Path(p.origin).stem,
                                                               name=name)))

    def _exported_voice(self, path: Path) -> VoiceState:
        """A voice exported by the package (its attention cache after the voice prompt,
        ``export_model_state``): the K/V go straight into this engine's cache as a template
        (``Engine.share_kv``); no rows are recomputed, and no RNG is drawn (the package's
        loaded states draw none, unlike its audio prompts)."""
        from calm_fast.model.weights import read_safetensors
        from calm_fast.runtime.voices import pocket_kv_voice

        if not path.is_file():
            raise MissingFileError(f"no voice file at {path}")
        _, tensors = read_safetensors(path, "voice file")
        kv = pocket_kv_voice(tensors, self.lm.cfg.backbone, str(path))
        shared = self.engine.share_kv(kv.k, kv.v)
        state = VoiceState(shared.rows, shared)
        weakref.finalize(state, self.engine.unshare, shared)
        return state

    def _voice(self, rows: torch.Tensor) -> VoiceState:
        state = VoiceState(rows)
        try:
            state.shared = self.engine.share(rows)
        except CacheFullError:  # no room to keep it: requests prefill the rows themselves
            return state
        weakref.finalize(state, self.engine.unshare, state.shared)
        return state

    def _chunks(self, text: str, max_tokens: int, frames_after_eos):
        """(token ids, frames_after_eos) per sentence chunk, by the package's own rules."""
        from pocket_tts.models.text_chunking import prepare_text_prompt, split_into_best_sentences

        p = self.peer
        opts = (p.pad_with_spaces_for_short_inputs, p.remove_semicolons,
                p.append_terminal_punctuation, p.capitalize_first_letter, p.replace_characters)
        out = []
        for chunk in split_into_best_sentences(p.flow_lm.conditioner.tokenizer, text,
                                               max_tokens, *opts):
            prepared, guess = prepare_text_prompt(chunk, *opts)
            ids = p.flow_lm.conditioner.prepare(prepared)[0].cpu()
            fae = frames_after_eos
            if fae is None:
                fae = (p.model_recommended_frames_after_eos
                       if p.model_recommended_frames_after_eos is not None else guess + 2)
            out.append((ids, fae))
        return out

    def _request(self, state: VoiceState, ids, fae: int, gen: torch.Generator) -> Request:
        p = self.peer
        gen_len = math.ceil((len(ids) / p._TOKENS_PER_SECOND_ESTIMATE + p._GEN_SECONDS_PADDING)
                            * self.lm.cfg.frame_rate)
        prefix = torch.cat([state.rows, self.lm.conditioner(ids)])
        return Request(prefix, gen_len, temperature=p.temp, eos_threshold=p.eos_threshold,
                       frames_after_eos=fae, min_frames=p._MIN_FRAMES_BEFORE_EOS,
                       noise_clamp=p.noise_clamp, generator=gen)

    def _fade(self, wav: torch.Tensor) -> torch.Tensor:
        """The package fades the first 5 ms of each chunk in (a fresh decoder's step)."""
        n = min(self.sample_rate // 200, wav.shape[-1])
        wav[:n] *= torch.linspace(0, 1, self.sample_rate // 200)[:n]
        return wav

    @torch.no_grad()
    def generate_audio_stream(self, model_state: VoiceState, text_to_generate: str,
                              max_tokens: int = 50, frames_after_eos: int | None = None,
                              copy_state: bool = True, stop=None):
        """Audio chunks [samples] as they are decoded: the first is one frame (80 ms),
        then 2, 4, ... up to ``decode_frames`` (default 8) frames: the decoder's per-call
        cost is shared by a chunk's frames (benchmarks/results/design_notes.md), and the
        chunks still arrive well before the audio already out has played (``accelerate(...,
        decode_frames=1)`` gives the package's one chunk per frame). The audio is the same
        either way."""
        _check_state(model_state)
        _check_call(text_to_generate, max_tokens, frames_after_eos, copy_state)
        for ids, fae in self._chunks(text_to_generate, max_tokens, frames_after_eos):
            if stop is not None and stop.is_set():
                break
            gen = torch.Generator()
            gen.set_state(torch.get_rng_state())
            self._burn_draw(gen)  # the package samples once after prompting the text
            req = self._request(model_state, ids, fae, gen)
            rid = self.engine.submit(req, shared=model_state.shared)
            made, chunks, stopped, ended = 0, 0, False, False
            try:
                for ev in self.engine.run():
                    if ev.request != rid:
                        continue
                    made += ev.latent is not None
                    ended = ended or ev.finished
                    if ev.audio is not None:
                        wav = ev.audio[0].clone()
                        yield self._fade(wav) if chunks == 0 else wav
                        chunks += 1
                    if stop is not None and stop.is_set():
                        stopped = True
                        break
                # The package's loop computes (and draws for) one more frame before it
                # sees that the frames after EOS are done; the engine stops right away.
                if not stopped and fae >= 1 and made < req.max_frames:
                    self._burn_draw(gen)
            finally:
                # stopped, or the caller closed the iterator (or raised into it) mid-text:
                # the request must not keep running in the engine under the next call
                if not ended:
                    self.engine.cancel(rid)
                torch.set_rng_state(gen.get_state())

    def generate_audio(self, model_state: VoiceState, text_to_generate: str,
                       max_tokens: int = 50, frames_after_eos: int | None = None,
                       copy_state: bool = True) -> torch.Tensor:
        chunks = list(self.generate_audio_stream(model_state, text_to_generate, max_tokens,
                                                 frames_after_eos, copy_state))
        return torch.cat(chunks) if chunks else torch.zeros(0)

    # -- what the package lacks ----------------------------------------------------------------
    @torch.no_grad()
    def generate_audio_batch(self, model_state, texts: list[str], seed: int = 0,
                             max_tokens: int = 50, frames_after_eos: int | None = None
                             ) -> list[torch.Tensor]:
        """Many texts at once (one voice state, or one per text), one engine batch: the
        voice prefix is prefilled once and shared. Request i draws from seed + i. Each text
        must fit one chunk of ``max_tokens``."""
        checks.instance("texts", texts, list, "a list of str")
        states = model_state if isinstance(model_state, list) else [model_state] * len(texts)
        if len(states) != len(texts) or not texts:
            raise ArgumentError(f"{len(texts)} texts for {len(states)} voice states")
        for st in states:
            _check_state(st)
        checks.integer("seed", seed, 0, 2**63 - 1)
        for i, text in enumerate(texts):
            _check_call(text, max_tokens, frames_after_eos, True, name=f"texts[{i}]")
        shared = {}
        ids = {}
        done = False
        try:
            for i, (st, text) in enumerate(zip(states, texts)):
                chunks = self._chunks(text, max_tokens, frames_after_eos)
                if len(chunks) != 1:
                    raise ArgumentError(f"text {i} splits into {len(chunks)} chunks; batch calls "
                                     f"take texts of at most {max_tokens} tokens")
                if id(st) not in shared:
                    shared[id(st)] = st.shared or self.engine.share(st.rows)
                gen = torch.Generator().manual_seed(seed + i)
                self._burn_draw(gen)
                ids[self.engine.submit(self._request(st, *chunks[0], gen),
                                       shared=shared[id(st)])] = i
            out: list[list] = [[] for _ in texts]
            for ev in self.engine.run():
                if ev.audio is not None and ev.request in ids:
                    out[ids[ev.request]].append(ev.audio[0])
            done = True
        finally:
            if not done:  # a bad text (or an interrupt) must not leave requests queued
                for rid in ids:
                    self.engine.cancel(rid)
            owned = {id(st.shared) for st in states}
            for s in shared.values():
                if id(s) not in owned:
                    self.engine.unshare(s)
        return [self._fade(torch.cat(c)) if c else torch.zeros(0) for c in out]


def _check_state(state) -> None:
    if not isinstance(state, VoiceState):
        raise ArgumentTypeError(f"model_state must come from this object's "
                                f"get_state_for_audio_prompt(), got {type(state).__name__}")


def _check_call(text, max_tokens, frames_after_eos, copy_state, name="text_to_generate"):
    """The package's generation arguments: a non-empty str, max_tokens per chunk in
    [1, 10000], frames_after_eos None or in [0, 10000], copy_state a bool."""
    checks.instance(name, text, str)
    if not text.strip():
        raise ArgumentError("Text prompt cannot be empty")  # the package's own words
    checks.integer("max_tokens", max_tokens, 1, 10_000)
    checks.integer("frames_after_eos", frames_after_eos, 0, 10_000, none=True)
    checks.instance("copy_state", copy_state, bool)


def accelerate(tts_model, **kw) -> AcceleratedTTS:
    """A pocket-tts ``TTSModel`` running on calm_fast (see the module docstring)."""
    return AcceleratedTTS(tts_model, **kw)
