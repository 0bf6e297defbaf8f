"""Shared fixtures: float64 scoped to one test, small deterministic keys."""

import jax
import pytest


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test only."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


# CI runs hypothesis derandomized: the examples are a fixed function of each test, so a
# submission that passed here passes there; locally every run explores new examples.
import os  # noqa: E402

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
