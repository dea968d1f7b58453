"""Tables for people, JSON for machines. Every verb hands rows (dicts with stable keys) here."""
from __future__ import annotations

import json
import sys


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ",".join(f"{k}={_cell(v)}" for k, v in value.items() if k != "per_cpu") or "-"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) or "-"
    return str(value)


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0].keys())
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def emit(rows, as_json: bool, columns: list[str] | None = None, empty: str = "") -> None:
    """rows: a list (listing verbs) or one dict (a created or shown object)."""
    if as_json:
        json.dump(rows, sys.stdout, indent=None if isinstance(rows, list) and len(rows) > 50 else 2)
        sys.stdout.write("\n")
        return
    rows_list = [rows] if isinstance(rows, dict) else rows
    text = table(rows_list, columns)
    if text:
        print(text)
    elif empty:
        print(empty)
