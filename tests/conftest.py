"""Shared fixtures: float64 scoped to one test, small deterministic keys."""

import os

import jax
import pytest

# The test suite never reads or writes the user's persistent compilation cache
# (~/.cache/jaxcam/xla): in-process `jaxcam.cli.main` calls and CLI subprocesses
# compile as without one. Tests of the cache pass their own directories.
os.environ["JAXCAM_COMPILATION_CACHE"] = "off"


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
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
