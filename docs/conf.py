"""Sphinx configuration for constrained_optim.

Build (fails on any warning: bad reST, a broken cross-reference, an undocumented public name)::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

or ``docs/build.sh``.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: import the working tree
sys.path.insert(0, os.path.join(HERE, "_ext"))

import constrained_optim  # noqa: E402

from optional_api import importable  # noqa: E402 - docs/_ext

project = "constrained_optim"
author = "constrained_optim contributors"
copyright = "constrained_optim contributors"  # noqa: A001
release = version = constrained_optim.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "api_coverage",
    "optional_api",
]

html_theme = "furo"
html_title = f"constrained_optim {release}"
exclude_patterns = ["_build", "questions/output", "guides/output"]
templates_path: list[str] = []

# -- references -------------------------------------------------------------------------------------
# The library's docstrings write `Name` (single backticks) for its own objects.
default_role = "py:obj"
# Every cross-reference must resolve: a broken one is a warning, and -W makes it an error.
nitpicky = True
# No intersphinx: the build machines have no network, so torch's inventory cannot be fetched.
# The names below are third-party objects that appear in signatures and docstrings; without an
# inventory Sphinx cannot link them, and they are not ours to document. Only such names belong
# here: a reference to anything in constrained_optim must resolve.
nitpick_ignore = [
    # torch (no inventory fetched: no network at build time)
    ("py:class", "torch.Tensor"),
    ("py:class", "torch.dtype"),
    ("py:class", "torch.optim.Optimizer"),
    ("py:class", "torch.optim.optimizer.Optimizer"),
    ("py:class", "torch.nn.Module"),
    ("py:class", "torch.nn.parameter.Parameter"),
    ("py:class", "torch.nn.modules.module.Module"),
    ("py:class", "nn.Module"),
    # the standard library's abc types in signatures (no Python inventory either)
    ("py:class", "collections.abc.Callable"),
    ("py:class", "collections.abc.Sequence"),
    ("py:class", "collections.abc.Iterable"),
    ("py:class", "collections.abc.Mapping"),
    ("py:class", "os.PathLike"),
    ("py:class", "re.Pattern"),
    # rich's types in Audit's rendering methods (no inventory; imported for annotations only,
    # so signatures show them by their short names)
    ("py:class", "Table"),
    ("py:class", "Console"),
    # the type variable that makes attach/detach return the caller's own class (self)
    ("py:class", "constrained_optim.surface._Surface"),
    # Lightning and transformers: base classes of the AuditCallbacks, and Lightning's
    # LightningModule named in constrained_optim.lightning's docstring (no inventories)
    ("py:class", "lightning.pytorch.callbacks.callback.Callback"),
    ("py:obj", "LightningModule"),
    ("py:class", "transformers.trainer_callback.TrainerCallback"),
    # "HuggingFace `transformers`" in constrained_optim.transformers' docstring means the
    # library, not our module of that name (_ext/api_coverage.py leaves listed names alone)
    ("py:obj", "transformers"),
]

# -- autodoc and napoleon -----------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- optional modules --------------------------------------------------------------------------------
# constrained_optim.lightning needs the `lightning` extra; constrained_optim.transformers (the HF
# Trainer callback) is documented once it exists and imports. Pages wrap their autodoc in
# `.. if-importable::` (_ext/optional_api.py), the coverage check asks for what imports, and
# references into a module that does not import render as plain text (_ext/api_coverage.py).
api_optional_modules = ["constrained_optim.lightning", "constrained_optim.transformers"]
HAS_LIGHTNING = importable("constrained_optim.lightning")
HAS_TRANSFORMERS_CALLBACK = importable("constrained_optim.transformers")

# -- the public API that must be documented (_ext/api_coverage.py) --------------------------------
api_coverage_all = ["constrained_optim"]
api_coverage_extra = [
    "constrained_optim.audit.Audit",
    "constrained_optim.constraints.base.Traits",
    "constrained_optim.constraints.base.Bound",
    "constrained_optim.constraints.base.Partition",
]
if HAS_LIGHTNING:
    api_coverage_extra.append("constrained_optim.lightning.AuditCallback")
if HAS_TRANSFORMERS_CALLBACK:
    api_coverage_extra.append("constrained_optim.transformers.AuditCallback")
