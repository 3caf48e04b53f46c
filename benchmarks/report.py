"""Benchmarks write their own section of BENCHMARKS.md (with --write): one function for all of them."""
from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(heading: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the section under `heading` ('## ...', up to the next '## ') with `body`, or append it; the others
    stay as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{heading}\n\n{body.rstrip()}\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    path.write_text(text)
