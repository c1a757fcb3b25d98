"""The transformers integration: A²ATS inside a plain Hugging Face model.

- :mod:`.patch`: routes a model's attention through a2ats while active (the base of the others).
- :mod:`.a2ats`: :class:`A2ATS`, decoding with a selection method: the reference path, or kernels.
- :mod:`.cache`: :class:`A2ATSCache`, a transformers cache that also holds each token's codes.
- :mod:`.calibrate`: codebooks from the queries and keys of a calibration forward.
- :mod:`.generate`: prompts and streaming generation with ``model.generate``.
- :mod:`.precision`: autocast for dense passes; bf16 weight reads for decode-sized calls.
"""

from a2ats.hf.a2ats import A2ATS
from a2ats.hf.cache import A2ATSCache
from a2ats.hf.patch import ModelPatch, attention_modules, dense

__all__ = ["A2ATS", "A2ATSCache", "ModelPatch", "attention_modules", "dense"]
