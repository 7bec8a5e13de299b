"""MkDocs hook: show the reST roles of the code's docstrings (``:func:`name```) as plain code names.

mkdocstrings renders the docstrings as Markdown, where a role such as ``:func:`dpo_loss``` comes
out as the text ``:func:`` followed by ``<code>dpo_loss</code>``. This hook drops the role prefix
from the rendered HTML of every page, so only the code name remains.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|const|ref|py:\w+):(?=<code>)")


def on_page_content(html: str, **kwargs: object) -> str:
    """Strip ``:role:`` prefixes that directly precede a ``<code>`` element."""
    return _ROLE.sub("", html)
