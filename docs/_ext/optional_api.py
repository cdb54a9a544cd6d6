"""``.. if-importable:: module``: the directive's content is part of the page only if ``module``
imports (an optional extra such as ``lightning``), otherwise ``:else:`` text is shown instead.

Sphinx's ``only`` and ``ifconfig`` decide at write time, after autodoc has already tried (and
failed) to import what their content documents; this decides while reading.
"""

from __future__ import annotations

import importlib

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def importable(modname: str) -> bool:
    try:
        importlib.import_module(modname)
    except ImportError:
        return False
    return True


class IfImportable(SphinxDirective):
    required_arguments = 1
    has_content = True
    option_spec = {"else": directives.unchanged}

    def run(self):
        if not importable(self.arguments[0]):
            text = self.options.get("else")
            if not text:
                return []
            note = nodes.note()
            lines = StringList([line.strip() for line in text.splitlines()], source=self.get_source_info()[0])
            self.state.nested_parse(lines, self.content_offset, note)
            return [note]
        holder = nodes.Element()
        nested_parse_with_titles(self.state, self.content, holder, self.content_offset)
        return holder.children


def setup(app):
    app.add_directive("if-importable", IfImportable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
