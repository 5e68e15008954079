"""Sphinx configuration: the API reference and the guides (Markdown).

Build: ``pip install -e ".[docs]"`` then
``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

import pathlib
import sys

# Document this checkout, whichever jax_softmax is installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax_softmax  # noqa: E402

project = "jax_softmax"
author = "jax_softmax contributors"
copyright = "jax_softmax contributors"  # noqa: A001
release = version = jax_softmax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown guides: $$ math, and anchors for the section headings.
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# Docstrings are Google style.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Names and defaults only: `jax.typing.ArrayLike` would print as its
# expanded Union; the Args sections give shapes and dtypes.
autodoc_typehints = "none"
autodoc_member_order = "bysource"

# Every cross-reference must resolve (a broken :func:`...` in a docstring
# fails the build under -W), except the classes of annotations from other
# packages: no intersphinx (it would download their inventories).
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(jax|jaxlib|numpy|np|typing|collections)(\..*)?"),
]

html_theme = "furo"
html_title = f"jax_softmax {release}"


def _check_public_names(app, env):
  """Warn (an error under -W) for a name of ``__all__`` without an entry."""
  from sphinx.util import logging

  documented = set(env.get_domain("py").objects)
  for name in jax_softmax.__all__:
    if f"jax_softmax.{name}" not in documented:
      logging.getLogger(__name__).warning(
          "jax_softmax.%s is in __all__ but has no entry in the API "
          "reference (docs/api.rst)", name)


def setup(app):
  app.connect("env-updated", _check_public_names)
