"""Strict test configuration shared by the whole suite."""

import os

import hypothesis
import jax

# Implicit rank promotion hides shape bugs: make it an error (as equinox).
jax.config.update("jax_numpy_rank_promotion", "raise")

# The first call of each example compiles: no deadline. "ci" is fixed
# (derandomized) so failures reproduce, and skips shrinking so a failing
# property costs its 25 examples, not hundreds; "dev" (the default) shrinks.
hypothesis.settings.register_profile(
    "ci", deadline=None, max_examples=25, derandomize=True, print_blob=True,
    phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate))
hypothesis.settings.register_profile("dev", deadline=None, max_examples=25)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
