"""Tables for people: rich terminal tables of frames, and inspections as frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
from rich.table import Table

from workbench.ops.inspection import (
    CONSUMER_COLUMNS,
    DEAD_LETTER_COLUMNS,
    GROUP_COLUMNS,
    STREAM_COLUMNS,
    Inspection,
    wide_console,
)


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


@dataclass(frozen=True)
class InspectionFrames:
    """An :class:`~workbench.ops.inspection.Inspection` as pandas frames."""

    redis_version: str
    streams: pd.DataFrame
    groups: pd.DataFrame
    consumers: pd.DataFrame
    dead_letters: pd.DataFrame


def inspection_frames(inspection: Inspection) -> InspectionFrames:
    """Frames of a snapshot; nullable integer columns where Redis may not answer."""
    groups = pd.DataFrame(inspection.groups, columns=GROUP_COLUMNS)
    for column in ("oldest_pending_idle_ms", "lag", "lag_xinfo"):
        groups[column] = groups[column].astype("Int64")
    return InspectionFrames(
        redis_version=inspection.redis_version,
        streams=pd.DataFrame(inspection.streams, columns=STREAM_COLUMNS),
        groups=groups,
        consumers=pd.DataFrame(inspection.consumers, columns=CONSUMER_COLUMNS),
        dead_letters=pd.DataFrame(inspection.dead_letters, columns=DEAD_LETTER_COLUMNS),
    )


__all__ = ["InspectionFrames", "frame_table", "inspection_frames", "wide_console"]
