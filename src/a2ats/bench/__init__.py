"""Benchmarks (`a2ats bench kernels | decode`): speed and memory figures live here, never in timed tests."""
