"""Two checks the documentation build needs beyond Sphinx's own.

1. **Every public name is documented.** After all pages are read, each name in the ``__all__`` of
   the modules listed in ``api_coverage_all`` (and each dotted name in ``api_coverage_extra``)
   must be a documented Python object under exactly that name (an ``autoclass`` /
   ``autofunction`` / ``py:*`` directive that is not ``:no-index:``). A missing one is a warning,
   so ``sphinx -W`` fails the build: a name added to ``__all__`` without documentation cannot slip
   through.

2. **Bare names resolve to the one object that has them.** The library's docstrings refer to
   other objects with single backticks and their short name (```Bound```, ```AuditRecord```),
   written from wherever the docstring lives. Sphinx resolves such a reference only relative to
   the module and class it appears in, so ```Bound``` inside ``constrained_optim.Constraint``
   does not find ``constrained_optim.constraints.base.Bound``. When Sphinx's own lookup fails,
   the reference is retried as Sphinx resolves ``.Bound`` (a match on the last components of the
   documented names). If exactly one documented object matches it resolves; if several do,
   Sphinx warns "more than one target"; if none does, the usual nitpicky warning stands. Names in
   ``nitpick_ignore`` (third-party names) are never retried, so ```transformers``` meaning the
   Hugging Face library is not linked to ``constrained_optim.transformers``. Nothing is guessed
   and nothing is silenced.

3. **Optional modules degrade to text.** A reference into a module of ``api_optional_modules``
   that does not import (its extra, e.g. ``lightning``, is not installed) is rendered as plain
   text instead of failing the build; the pages document such modules inside
   ``.. if-importable::`` (optional_api.py), and the coverage check only asks for what imports.
"""

from __future__ import annotations

import importlib

from sphinx.util import logging

from optional_api import importable

logger = logging.getLogger(__name__)


def required_names(config) -> list[str]:
    names: list[str] = []
    for modname in config.api_coverage_all:
        module = importlib.import_module(modname)
        names.extend(f"{modname}.{name}" for name in module.__all__)
    names.extend(config.api_coverage_extra)
    return names


def check_documented(app, env) -> None:
    objects = env.get_domain("py").objects
    for name in required_names(app.config):
        entry = objects.get(name)
        if entry is None or entry.aliased:
            logger.warning(
                "public name %s is not documented (add it to an API page, e.g. `.. autoclass::`)",
                name,
                type="api_coverage",
                subtype="undocumented",
            )


def resolve_by_suffix(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    for modname in app.config.api_optional_modules:
        if (target == modname or target.startswith(modname + ".")) and not importable(modname):
            return contnode  # its extra is not installed: plain text, not a broken link
    if node.hasattr("refspecific"):
        return None
    if (f"py:{node['reftype']}", node["reftarget"]) in app.config.nitpick_ignore:
        return None  # a third-party name (conf.py says so): never link it to one of ours
    retry = node.deepcopy()
    retry["refspecific"] = True  # Sphinx's own lookup for ".name": a suffix match, unique or warned
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], node["reftarget"], retry, contnode
    )


def setup(app):
    app.add_config_value("api_coverage_all", [], "env")
    app.add_config_value("api_coverage_extra", [], "env")
    app.add_config_value("api_optional_modules", [], "env")
    app.connect("env-check-consistency", check_documented)
    app.connect("missing-reference", resolve_by_suffix)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
