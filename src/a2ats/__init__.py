"""a2ats: A²ATS retrieval attention (windowed RoPE + query-aware VQ) for Hugging Face causal LMs.

The layers, top to bottom (each imports only from those below it; CI checks it): ``cli``; ``eval`` and
``bench`` (tooling); ``runtime`` (the lean decode runtime and server) and ``hf`` (inside transformers);
``methods`` (one selection method per file); ``kernels`` (fast paths beside their references); ``core``
(the algorithm in plain torch) and ``assets`` (models and texts, offline).
"""

from a2ats.assets.models import load_model
from a2ats.core.codebook import CodebookError, Codebooks, CodebookSettings
from a2ats.core.config import A2ATSConfig, Budget
from a2ats.core.support import UnsupportedModelError
from a2ats.hf import A2ATS, A2ATSCache
from a2ats.hf.calibrate import calibrate, load_or_calibrate

__all__ = ["A2ATS", "A2ATSCache", "A2ATSConfig", "Budget", "CodebookError", "Codebooks", "CodebookSettings",
           "UnsupportedModelError", "calibrate", "load_model", "load_or_calibrate"]
__version__ = "0.1.0"
