"""Sphinx HTML math renderer: TeX -> inline SVG at build time, no JavaScript, no network.

Why this and not MathJax in the browser: ``sphinx.ext.mathjax`` loads MathJax from a
CDN, so an offline reader (or one behind a strict proxy) sees raw TeX. Vendoring
MathJax into ``_static`` works but copies ~25 MB of scripts and fonts into every build
and still needs JavaScript in the reader's browser. Rendering here, with MathJax itself
(``quickjax``: MathJax 4 running in the embedded QuickJS engine, installed from PyPI by
the ``docs`` extra), gives the same typesetting as MathJax, as self-contained ``<svg>``
elements (glyph outlines included, no web fonts) that any browser shows without
scripts. A formula MathJax cannot parse is a build warning (so ``-W`` fails), never a
red box on a published page. matplotlib's mathtext was the other candidate: it lacks
``\\Big``, ``\\operatorname`` and the AMS environments these pages use.

Each formula is rendered once per process (cached by source), ~40 ms each.
"""
from __future__ import annotations

import hashlib
import html
import re
from functools import lru_cache

from docutils import nodes
from sphinx.locale import _
from sphinx.util import logging
from sphinx.util.math import get_node_equation_number

logger = logging.getLogger(__name__)

RENDERER = "svgmath"
_ERROR_MARK = 'data-mml-node="merror"'
# MathJax's noundefined extension shows an unknown macro as red text instead of failing
_UNDEFINED = re.compile(r'data-mml-node="mtext" fill="red" stroke="red" data-latex="([^"]*)"')
_IDS = re.compile(r"MJX-\d+-")


@lru_cache(maxsize=1)
def _renderer():
    from quickjax import MathJaxRenderer  # docs extra; imported only when building
    return MathJaxRenderer()


@lru_cache(maxsize=4096)
def tex_to_svg(tex: str, display: bool) -> str:
    """The SVG of one formula; raises ValueError with MathJax's message on bad TeX."""
    svg = _renderer().render(tex, display=display)
    if _ERROR_MARK in svg:
        found = re.search(r'<title>(.*?)</title>|data-mjx-error="([^"]*)"', svg)
        why = next((g for g in found.groups() if g), "") if found else ""
        raise ValueError(f"MathJax cannot typeset {tex!r}: {html.unescape(why) or 'error'}")
    undefined = _UNDEFINED.search(svg)
    if undefined:
        raise ValueError(f"MathJax does not know {html.unescape(undefined.group(1))} "
                         f"in {tex!r}")
    # MathJax numbers its glyph ids per renderer call (MJX-1-, MJX-2-, ...); make them a
    # function of the formula so that pages built in any order or process never collide.
    prefix = "MJX-" + hashlib.sha1(f"{display}{tex}".encode()).hexdigest()[:10] + "-"
    return _IDS.sub(prefix, svg)


def _svg_or_source(translator, node, tex: str, display: bool) -> str:
    """The SVG with the TeX as its accessible name; on bad TeX a warning and the source."""
    try:
        svg = tex_to_svg(tex, display)
    except Exception as exc:  # noqa: BLE001 - any renderer failure is one build warning
        logger.warning("math not rendered: %s", exc, location=node, type="svgmath")
        return f'<code class="math-error">{translator.encode(tex)}</code>'
    label = html.escape(tex.strip(), quote=True)
    return svg.replace("<svg ", f'<svg aria-label="{label}" ', 1)


def html_visit_math(self, node):
    tex = node.astext()
    self.body.append(self.starttag(node, "span", "", CLASS="math svgmath"))
    self.body.append(_svg_or_source(self, node, tex, display=False) + "</span>")
    raise nodes.SkipNode


def display_tex(node) -> str:
    """The TeX of a math block as sphinx.ext.mathjax would hand it to MathJax."""
    if node.get("no-wrap", node.get("nowrap", False)):
        return node.astext()
    parts = [p for p in node.astext().split("\n\n") if p.strip()]
    parts = [r"\begin{split}" + p + r"\end{split}" if r"\\" in p else p for p in parts]
    if len(parts) > 1:
        return r"\begin{aligned}" + r"\\".join(parts) + r"\end{aligned}"
    return parts[0] if parts else ""


def html_visit_displaymath(self, node):
    self.body.append(self.starttag(node, "div", CLASS="math svgmath"))
    if node.get("number"):
        number = get_node_equation_number(self, node)
        self.body.append(f'<span class="eqno">({number})')
        self.add_permalink_ref(node, _("Link to this equation"))
        self.body.append("</span>")
    self.body.append(_svg_or_source(self, node, display_tex(node), display=True))
    self.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app):
    app.add_html_math_renderer(RENDERER, (html_visit_math, None),
                               (html_visit_displaymath, None))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
