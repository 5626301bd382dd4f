"""Tables that fit the terminal without cutting a name or an address short.

Rich shrinks a table wider than the console by wrapping or truncating cells (`local…`, `127.0…`).
Instead, `fitted_table` measures every cell, then at narrow widths first stacks two columns into one
cell of two lines (a node's name over its address), then drops the least important columns, and
gives each remaining column exactly its widest cell (headers wrap between words): what is shown is shown whole.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

_BORDER = 3  # a column costs its content plus one space each side and a rule


def console_width(console: Console | None) -> int:
    return console.width if console is not None else Console().width


def stdout_console() -> Console:
    """stdout; when piped and no COLUMNS is set, a wide fixed width so that tables stay one per line."""
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=160 if wide else None)


def _cell_width(text: str) -> int:
    return max((len(line) for line in str(text).splitlines()), default=0)


def _widths(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    widths = []
    for i, header in enumerate(headers):
        words = max((len(w) for w in header.split()), default=0)  # a header may wrap between words
        widths.append(max([words, *(_cell_width(r[i]) for r in rows)]))
    return widths


def _needed(widths: list[int]) -> int:
    return 1 + sum(w + _BORDER for w in widths)


def fitted_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    keep: set[str],
    drop_order: Sequence[str] = (),
    stack: tuple[str, str] | None = None,
    title: str | None = None,
    console: Console | None = None,
    width: int | None = None,
    caption: str | None = None,
) -> Table:
    """A table of `rows` under `headers` at most `width` (default: the console's) columns wide.

    stack: two headers whose cells become one two-line cell when the table is too wide; then
    columns are dropped in `drop_order` (the rest of the non-`keep` columns after it, last first)."""
    width = width or console_width(console)
    headers, rows = list(headers), [list(map(str, r)) for r in rows]
    if stack is not None and _needed(_widths(headers, rows)) > width:
        a, b = headers.index(stack[0]), headers.index(stack[1])
        for r in rows:
            r[a] = f"{r[a]}\n{r[b]}" if r[b] else r[a]
            del r[b]
        headers[a] = f"{stack[0]} / {stack[1]}"
        del headers[b]
        keep = keep | {headers[a]}
    order = [h for h in drop_order if h in headers] + [h for h in reversed(headers) if h not in drop_order]
    for victim in order:
        if _needed(_widths(headers, rows)) <= width:
            break
        if victim in keep or victim not in headers:
            continue
        i = headers.index(victim)
        del headers[i]
        for r in rows:
            del r[i]
    widths = _widths(headers, rows)
    for i, header in enumerate(headers):  # room to spare: headers on one line
        if _needed(widths) + max(0, len(header) - widths[i]) <= width:
            widths[i] = max(widths[i], len(header))
    over = _needed(widths) - width
    if over > 0:  # what must stay is still too wide (a long path): its widest column folds onto more lines
        widest = max(range(len(widths)), key=widths.__getitem__)
        widths[widest] = max(8, widths[widest] - over)
    table = Table(title=title, caption=caption)
    for header, w in zip(headers, widths, strict=True):
        left = header in keep
        table.add_column(header, justify="left" if left else "right", width=w, overflow="fold")
    for r in rows:
        table.add_row(*(Text(cell) for cell in r))  # cells are data, not markup ("[fe80::1]:7")
    return table
