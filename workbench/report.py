"""Terminal tables (rich) for inspections and run summaries."""

from __future__ import annotations

from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from workbench.inspection import Inspection


def _cell(value: Any) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "NULL"
    return str(value)


def frame_table(df: pd.DataFrame, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in df.columns:
        numeric = pd.api.types.is_numeric_dtype(df[column])
        table.add_column(str(column), justify="right" if numeric else "left")
    for row in df.itertuples(index=False):
        table.add_row(*(_cell(v) for v in row))
    return table


def wide_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output is piped."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_inspection(result: Inspection, console: Console | None = None) -> None:
    console = console or wide_console()
    console.print(f"Redis {result.redis_version}")
    console.print(frame_table(result.streams, "streams"))
    console.print(frame_table(result.groups, "consumer groups"))
    if len(result.consumers):
        console.print(frame_table(result.consumers, "consumers"))
    if len(result.dead_letters):
        console.print(frame_table(result.dead_letters, "dead letters"))
    else:
        console.print("dead letters: none")
