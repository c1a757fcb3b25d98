"""Where the generated blocks are: the Markdown files the figures cover, and the markers that open and close a block
in them."""

from __future__ import annotations

import re
from pathlib import Path

BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w.-]+) -->)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)
OPEN = re.compile(r"<!-- (/?)figures:([\w.-]+) -->")


def doc_files(root: Path) -> list[Path]:
    """README.md and every Markdown file under docs/: where blocks are rendered and what the lint reads."""
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    return files + sorted(p for p in (root / "docs").rglob("*.md") if p.is_file())
