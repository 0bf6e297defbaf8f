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
