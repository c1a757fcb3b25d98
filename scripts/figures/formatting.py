"""How the blocks write numbers and tables: context lengths, Markdown tables, milliseconds, ratios, paragraphs."""

from __future__ import annotations


def k(n: int) -> str:
    """A context length as the docs write it: 4096 -> 4K; 32000 (the needle length) -> 32K."""
    return f"{round(n / 1024)}K"


def table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def ms(x: float) -> str:
    return f"{x:.1f}"


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def paragraphs(lines: list[str]) -> list[str]:
    """Source lines as paragraphs of their own (consecutive Markdown lines would run together)."""
    return [x for line in lines for x in (line, "")][:-1]
