"""Small Sphinx fix for the book's HTML.

Under Jupyter Book 1.x, sphinx-thebe registers its inline configuration script twice; both copies
declare ``const THEBE_JS_URL``, so every page throws ``SyntaxError: Identifier 'THEBE_JS_URL' has
already been declared``. Keep only the first such script on each page.
"""

from __future__ import annotations

from typing import Any

THEBE_MARKER = "const THEBE_JS_URL"


def _drop_second_thebe_config(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    kept, seen_thebe = [], False
    for js in scripts:
        body = str(getattr(js, "attributes", {}).get("body", ""))
        if THEBE_MARKER in body:
            if seen_thebe:
                continue
            seen_thebe = True
        kept.append(js)
    context["script_files"] = kept


def setup(app: Any) -> dict:
    app.connect("html-page-context", _drop_second_thebe_config, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
