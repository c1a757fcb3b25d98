"""a2ats: A²ATS retrieval attention (windowed RoPE + query-aware VQ) for Hugging Face causal LMs.

The layers, top to bottom (each imports only from those below it; CI checks it): ``cli``; ``eval`` and
``bench`` (tooling); ``factory`` (picks the runtime and path); ``runtime`` (the lean decode runtime: one
engine for a prompt, a batch or a served queue) and ``hf`` (inside transformers);
``methods`` (one selection method per file); ``kernels`` (fast paths beside their references); ``core``
(the algorithm in plain torch) and ``assets`` (models and texts, offline).
"""

from a2ats.assets.models import load_model
from a2ats.core.codebook import CodebookError, Codebooks, CodebookSettings
from a2ats.core.config import A2ATSConfig, Budget
from a2ats.core.support import UnsupportedModelError
from a2ats.factory import decoder
from a2ats.hf import A2ATS, A2ATSCache
from a2ats.hf.calibrate import calibrate, load_or_calibrate
from a2ats.runtime import Engine, Request

__all__ = ["A2ATS", "A2ATSCache", "A2ATSConfig", "Budget", "CodebookError", "Codebooks", "CodebookSettings", "Engine",
           "Request", "UnsupportedModelError", "calibrate", "decoder", "load_model", "load_or_calibrate"]
__version__ = "0.1.0"
