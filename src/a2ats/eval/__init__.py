"""Evaluation: metrics and harnesses built on the library, kept apart from it."""
