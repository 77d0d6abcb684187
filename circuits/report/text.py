"""Text from tests made safe to show: one function every output (terminal summary, report.md,
report.html, failure messages) passes names and messages through.

A claim name, reason or message is whatever a test wrote; shown raw, an ANSI / OSC escape can clear
the screen or recolour a line ("FAKE ALL PASSED"), BEL rings, a newline forges a summary line, and a
bidi override (U+202E) reverses what follows. `visible` keeps such characters as their visible escape
(``\\x1b``, ``\\u202e``), so nothing is hidden and nothing acts, and cuts long text (a 60,000-character
name made one Markdown line). report.json keeps the full, unaltered text.

Leaf module: imports nothing from `circuits`.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["visible", "NAME_LIMIT", "TEXT_LIMIT"]

NAME_LIMIT = 200  # a claim or test name in a table or a summary line
TEXT_LIMIT = 2000  # a message, reason or detail

# C0 controls (tab and newline too: one line each), DEL, C1 controls (8-bit CSI / OSC among them), and
# the Unicode format characters that reorder or hide text: bidi embeddings, overrides and isolates,
# the directional marks, line / paragraph separators, zero-width characters, the BOM
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _escape(m: re.Match) -> str:
    c = m.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


_UNSAFE_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def visible(text: Any, limit: int | None = TEXT_LIMIT, keep_lines: bool = False) -> str:
    """``text`` as one line with every control / format character shown as its escape, cut to
    ``limit`` characters (None: never) with a note of how much was left out. keep_lines: newlines
    and tabs stay (for an HTML page, where they cannot forge a terminal line)."""
    s = (_UNSAFE_KEEP_LINES if keep_lines else _UNSAFE).sub(_escape, str(text if text is not None else ""))
    if limit is not None and len(s) > limit:
        keep = max(limit - len(f"… (+{len(s)} chars)"), 1)
        s = s[:keep] + f"… (+{len(s) - keep} chars)"
    return s
