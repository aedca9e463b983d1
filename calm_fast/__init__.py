"""calm_fast: fast Continuous Audio Language Models (CALM) and Pocket TTS-compatible generation."""
__version__ = "0.1.0"

from .errors import CacheFullError, CalmFastError, UnknownStreamError  # noqa: F401


def accelerate(tts_model, **kw):
    """A pocket-tts ``TTSModel`` running on calm_fast's engine (``calm_fast.accelerate``)."""
    from calm_fast.runtime.dropin import accelerate as _accelerate

    return _accelerate(tts_model, **kw)
