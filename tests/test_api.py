"""The public API: __all__, docs/api.rst, signatures and docstrings."""

import inspect
import re
from pathlib import Path

import jax
import jax.scipy.special
import optax
import pytest

import jax_softmax as js

API_RST = Path(__file__).resolve().parents[1] / "docs" / "api.rst"
# The directives that document one name (``.. module::`` names none).
_DIRECTIVE = re.compile(
    r"^\.\. (?:auto(?:function|class|data|attribute|exception)"
    r"|py:(?:function|class|data|attribute|exception)):: +"
    r"(?:jax_softmax\.)?([\w.]+)", re.MULTILINE)

# The public functions: every callable of __all__ but the classes.
FUNCTIONS = sorted(n for n in js.__all__
                   if callable(getattr(js, n, None))
                   and not inspect.isclass(getattr(js, n)))


def _documented():
  return _DIRECTIVE.findall(API_RST.read_text(encoding="utf-8"))


def _params(fn):
  return [(p.name, p.kind, p.default)
          for p in inspect.signature(fn).parameters.values()]


# --------------------------------------------------------------------------
# __all__ and the API reference


def test_every_name_in_all_imports():
  namespace = {}
  exec("from jax_softmax import *", namespace)
  assert len(set(js.__all__)) == len(js.__all__), js.__all__
  for name in js.__all__:
    assert name in namespace, name
    assert namespace[name] is getattr(js, name)


def test_no_private_name_in_all_but_the_version():
  private = [n for n in js.__all__ if n.startswith("_")]
  assert private == ["__version__"]
  assert isinstance(js.__version__, str) and js.__version__


def test_all_and_the_api_reference_name_the_same_names():
  documented = _documented()
  assert len(set(documented)) == len(documented), documented
  assert sorted(documented) == sorted(js.__all__), (
      f"in __all__ only: {sorted(set(js.__all__) - set(documented))}; "
      f"in {API_RST.name} only: {sorted(set(documented) - set(js.__all__))}")


# --------------------------------------------------------------------------
# signatures

# The leading (positional) parameters; every other one is keyword-only, the
# options named here among them.
KEYWORD_ONLY = {
    "cross_entropy": (
        ("logits", "labels"),
        {"axis", "where", "ignore_index", "label_smoothing", "class_weights",
         "z_loss", "soft_cap", "reduction", "check_labels", "return_aux"}),
    "nll_loss": (
        ("log_probs", "labels"),
        {"axis", "where", "ignore_index", "class_weights", "reduction",
         "check_labels"}),
    "linear_cross_entropy": (
        ("x", "w", "labels"),
        {"bias", "chunk_size", "reduction", "where", "ignore_index",
         "label_smoothing", "class_weights", "z_loss", "soft_cap",
         "grad_in_forward", "axis_name", "batch_axis_name", "return_aux",
         "w_layout"}),
    "linear_softmax_loss": (
        ("W", "X", "y", "reg"),
        {"where", "ignore_index", "class_weights", "label_smoothing"}),
}


@pytest.mark.parametrize("name", sorted(KEYWORD_ONLY))
def test_options_are_keyword_only(name):
  positional, options = KEYWORD_ONLY[name]
  params = list(inspect.signature(getattr(js, name)).parameters.values())
  lead = params[:len(positional)]
  assert [p.name for p in lead] == list(positional)
  assert all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
             for p in lead), lead
  rest = params[len(positional):]
  not_kw = [p.name for p in rest if p.kind is not p.KEYWORD_ONLY]
  assert not not_kw, f"{name}: not keyword-only: {not_kw}"
  assert options <= {p.name for p in rest}, options - {p.name for p in rest}


@pytest.mark.parametrize("name", sorted(KEYWORD_ONLY))
def test_an_option_passed_by_position_is_a_type_error(name):
  positional, _ = KEYWORD_ONLY[name]
  # Binding fails before any computation: the arguments need not be arrays.
  with pytest.raises(TypeError):
    inspect.signature(getattr(js, name)).bind(*range(len(positional) + 1))


OPTAX = {
    "softmax_cross_entropy": optax.softmax_cross_entropy,
    "softmax_cross_entropy_with_integer_labels":
        optax.softmax_cross_entropy_with_integer_labels,
}


@pytest.mark.parametrize("name", sorted(OPTAX))
def test_optax_drop_ins_have_optaxs_signature(name):
  P = inspect.Parameter  # noqa: N806
  want = [("logits", P.POSITIONAL_OR_KEYWORD, P.empty),
          ("labels", P.POSITIONAL_OR_KEYWORD, P.empty),
          ("axis", P.POSITIONAL_OR_KEYWORD, -1),
          ("where", P.POSITIONAL_OR_KEYWORD, None)]
  assert _params(OPTAX[name]) == want  # (this optax's, as the issue reads)
  assert _params(getattr(js, name)) == _params(OPTAX[name])


JAX = {
    "softmax": [jax.nn.softmax],
    "log_softmax": [jax.nn.log_softmax],
    "logsumexp": [jax.nn.logsumexp, jax.scipy.special.logsumexp],
}


@pytest.mark.parametrize("name", sorted(JAX))
def test_primitives_have_jaxs_parameters(name):
  for theirs in JAX[name]:
    assert _params(getattr(js, name)) == _params(theirs), theirs


# --------------------------------------------------------------------------
# docstrings

# Docstrings without an Args section (or a math block), without an example.
NO_ARGS: set[str] = set()
NO_EXAMPLE: set[str] = set()


def _known_gap(name, gaps, what):
  marks = ()
  if name in gaps:
    marks = pytest.mark.xfail(
        strict=True, reason=f"{name}'s docstring has no {what} (a gap of "
        "jax_softmax's docstrings, not of this test)")
  return pytest.param(name, marks=marks)


def test_public_names_have_docstrings():
  for name in js.__all__:
    if name != "__version__":
      assert (getattr(js, name).__doc__ or "").strip(), name


@pytest.mark.parametrize(
    "name", [_known_gap(n, NO_ARGS, "Args section or .. math:: block")
             for n in FUNCTIONS])
def test_docstring_has_args_or_math(name):
  doc = inspect.getdoc(getattr(js, name)) or ""
  assert re.search(r"^Args:$", doc, re.MULTILINE) or ".. math::" in doc


@pytest.mark.parametrize(
    "name", [_known_gap(n, NO_EXAMPLE, "example (>>>)") for n in FUNCTIONS])
def test_docstring_has_an_example(name):
  assert ">>>" in (inspect.getdoc(getattr(js, name)) or "")

