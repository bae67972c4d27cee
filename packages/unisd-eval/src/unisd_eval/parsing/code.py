"""Code extraction from a completion, in the method's order (§5.1)."""

from __future__ import annotations

import json
import re

_PY_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_ANY_FENCE = re.compile(r"```[^\n`]*\r?\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> tuple[str, str]:
    """Return ``(code, how)``: ``how`` is ``json``, ``python``, ``fenced`` or ``raw``.

    Order: a JSON object ``{"code": ...}``; the first ```` ```python ```` block; the first fenced block
    in any language; else the stripped raw text. A fence left open (a truncated generation) runs to
    the end of the text.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("code"), str):
            return obj["code"], "json"
    match = _PY_FENCE.search(text)
    if match:
        return match.group(1).strip("\n"), "python"
    match = _ANY_FENCE.search(text)
    if match:
        return match.group(1).strip("\n"), "fenced"
    return stripped, "raw"
