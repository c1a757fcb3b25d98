"""The algorithm, in plain torch: what A²ATS computes, independent of how a model is run.

- :mod:`.config`: the decode-time settings (budget, sinks, window, WRoPE, GQA reduction).
- :mod:`.rope`: windowed RoPE (WRoPE) and its banded variant; undoing a model's rotation.
- :mod:`.kmeans`, :mod:`.codebook`: query-aware vector quantization of keys (fit, encode, save, load).
- :mod:`.selection`: from estimated scores to the tokens each KV head attends to (top-K, sinks, window, GQA).
- :mod:`.attention`: exact attention over a selection (the semantics every fast path must match).
- :mod:`.stats`: what decode steps attended to.
- :mod:`.support`: what a model must be for a2ats to run it, checked before any work.
"""
