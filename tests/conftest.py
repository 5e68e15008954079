"""Strict test configuration shared by the whole suite."""

import os

import hypothesis
import jax

# Implicit rank promotion hides shape bugs: make it an error (as equinox).
jax.config.update("jax_numpy_rank_promotion", "raise")

hypothesis.settings.register_profile(
    "ci", deadline=None, max_examples=25, derandomize=True,
    print_blob=True)
hypothesis.settings.register_profile("dev", deadline=None, max_examples=25)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
