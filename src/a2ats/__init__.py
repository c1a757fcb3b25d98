"""a2ats: A²ATS retrieval attention (windowed RoPE + query-aware VQ) for Hugging Face causal LMs."""

from .cache import A2ATSCache
from .codebook import CodebookError, Codebooks, CodebookSettings
from .config import A2ATSConfig, Budget
from .hf import A2ATS

__all__ = ["A2ATS", "A2ATSCache", "A2ATSConfig", "Budget", "CodebookError", "Codebooks", "CodebookSettings"]
__version__ = "0.1.0"
