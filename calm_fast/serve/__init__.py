"""The product's doors over the runtime: ``calm-fast tts | continue | music | export-voice |
voices | serve`` (and ``batch``).

* ``models``: ``--checkpoint`` / ``--vae`` / ``--tokenizer`` -> a ``Synth`` (LM + VAE);
  the shipped default slots in at ``calm_fast/assets/default/``.
* ``service``: ONE engine driven by one background thread; jobs (sentence chunks and
  pauses) in, audio chunks out, batched frame by frame, cancellable.
* ``audio_out``: WAV/PCM and PyAV-encoded formats, incrementally; tempo; resampling.
* ``commands``: the CLI commands as Python functions.
* ``server``: the FastAPI app (OpenAI ``/v1/audio/speech``, pocket-tts ``/tts``, voices,
  health, metrics, the page in ``static/``).
"""
