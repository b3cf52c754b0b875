"""A simulation run on disk: a manifest and Parquet tables.

The simulator writes these; the checker and the notebooks read them. Times
(``t...``) are seconds of the run's clock since its start (virtual time in a
SimPy run). Tables and their columns:

``commands``     t, command, escrow_id, actor, ok, error
``published``    event_id, type, stream, escrow_id, sequence, users (comma-joined),
                 amount (KES in the payload, or 0), t_committed, t_published
``handled``      group, event_id, handler_calls, max_delivery_count, t_first, t_last,
                 effects (rows/entries found at the end), expected_effects
``final``        group, pending, lag: each group's backlog when the run ended
``user_streams`` user, entry_id, event_id: every user-stream entry (the truth phones
                 are checked against). Virtual runs record entries as the fan-out
                 makes them, so history trimmed later still counts; real-time runs
                 read the streams at the end
``deliveries``   phone, connection, source ("replay", "live", "catch_up", "snapshot"),
                 entry_id, event_id, t. A "snapshot" row marks a resync: the phone lost
                 its Last-Event-ID and fetched the snapshot, whose ``as_of`` is entry_id
``phones``       phone, start_after: the id each phone's first connection resumed from
``samples``      t, group, pending, oldest_pending_age_s, lag, lag_s: the backlog
                 sampled from Redis; ages on the simulation's clock (entry ids are)
``faults``       t_start, t_end, kind, target, detail
``escrows``      id, buyer_id, seller_id, amount, state, seller_class, buyer_class
``ledger``       event_id, escrow_id, account, amount
``risk``         event_id, event_type, seller_id, score, model_version, t_event, t_scored:
                 the ``analytics`` group's online risk scores (empty without it)
``lost_entries`` user, entry_id, event_id, t: user-stream entries the fan-out made that
                 Redis then lost (a kill that lost acknowledged writes); they are not
                 part of the user's history, and the fan-out made them again

Every table is written even when empty, so readers need no special cases.
The simulator writes tables *as the run goes* (:class:`RunWriter`: Parquet row
groups of a fixed size), so its memory does not grow with the run's length;
``manifest.json`` is written last, so a directory without one is an
unfinished run and :meth:`RunTables.load` refuses it. A run being written also
holds an ``UNFINISHED`` file (:func:`mark_unfinished`) from its start until its
manifest is written: a run stopped halfway (Ctrl-C, or a simulator killed) keeps
it, saying why, and :meth:`RunTables.load` refuses the directory with
:class:`UnfinishedRun`, whatever tables it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS: dict[str, list[str]] = {
    "commands": ["t", "command", "escrow_id", "actor", "ok", "error"],
    "published": [
        "event_id", "type", "stream", "escrow_id", "sequence", "users", "amount",
        "t_committed", "t_published",
    ],
    "handled": [
        "group", "event_id", "handler_calls", "max_delivery_count", "t_first", "t_last",
        "effects", "expected_effects",
    ],
    "final": ["group", "pending", "lag"],
    "user_streams": ["user", "entry_id", "event_id"],
    "deliveries": ["phone", "connection", "source", "entry_id", "event_id", "t"],
    "phones": ["phone", "start_after"],
    "samples": ["t", "group", "pending", "oldest_pending_age_s", "lag", "lag_s"],
    "faults": ["t_start", "t_end", "kind", "target", "detail"],
    "escrows": ["id", "buyer_id", "seller_id", "amount", "state", "seller_class", "buyer_class"],
    "ledger": ["event_id", "escrow_id", "account", "amount"],
    "risk": ["event_id", "event_type", "seller_id", "score", "model_version", "t_event",
             "t_scored"],
    "lost_entries": ["user", "entry_id", "event_id", "t"],
}  # fmt: skip


_F, _I, _S, _B = pa.float64(), pa.int64(), pa.string(), pa.bool_()
SCHEMAS: dict[str, pa.Schema] = {
    name: pa.schema(list(zip(COLUMNS[name], types, strict=True)))
    for name, types in {
        "commands": [_F, _S, _S, _S, _B, _S],
        "published": [_S, _S, _S, _S, _I, _S, _I, _F, _F],
        "handled": [_S, _S, _I, _I, _F, _F, _I, _I],
        "final": [_S, _I, _I],
        "user_streams": [_S, _S, _S],
        "deliveries": [_S, _I, _S, _S, _S, _F],
        "phones": [_S, _S],
        "samples": [_F, _S, _I, _F, _I, _F],
        "faults": [_F, _F, _S, _S, _S],
        "escrows": [_S, _S, _S, _I, _S, _S, _S],
        "ledger": [_S, _S, _S, _I],
        "risk": [_S, _S, _S, _F, _S, _F, _F],
        "lost_entries": [_S, _S, _S, _F],
    }.items()
}


class TableWriter:
    """One table written as it grows: rows are buffered and flushed to the
    Parquet file as a row group every ``rows_per_group`` rows.

    ``append`` takes a dict, like a list would, so a model can be handed a
    writer where it would otherwise keep a list.
    """

    def __init__(self, path: Path, table: str, rows_per_group: int = 10_000) -> None:
        self.table = table
        self.schema = SCHEMAS[table]
        self.rows_per_group = rows_per_group
        self._writer = pq.ParquetWriter(path, self.schema)
        self._rows: list[dict[str, Any]] = []
        self.written = 0

    def append(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.rows_per_group:
            self.flush()

    def extend(self, rows: Any) -> None:
        for row in rows:
            self.append(row)

    def write_frame(self, frame: pd.DataFrame) -> None:
        self.flush()
        table = pa.Table.from_pandas(frame[COLUMNS[self.table]], preserve_index=False)
        self._writer.write_table(table.cast(self.schema))
        self.written += len(frame)

    def flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self.written += len(self._rows)
            self._rows = []

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def abandon(self) -> None:
        """Close the file as it is, without the rows not yet flushed (a run stopped)."""
        self._rows = []
        self._writer.close()


#: The file that marks a run directory unfinished; it says why.
UNFINISHED = "UNFINISHED"


class UnfinishedRun(FileNotFoundError):
    """The run directory holds a run that did not finish: no complete tables to read."""


def mark_unfinished(directory: str | Path, reason: str = "being written") -> Path:
    """Mark ``directory`` (made if need be) a run that is not finished, saying why, and
    take an earlier run's manifest out of it: until :meth:`RunWriter.close` writes the
    new one, the directory reads as unfinished. Returns the directory."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / UNFINISHED).write_text(reason + "\n")
    (path / "manifest.json").unlink(missing_ok=True)
    return path


class RunWriter:
    """A run directory being written: a :class:`TableWriter` per table; marked
    unfinished (:func:`mark_unfinished`) until :meth:`close`."""

    def __init__(self, directory: str | Path, rows_per_group: int = 10_000) -> None:
        self.directory = Path(directory)
        if not (self.directory / UNFINISHED).exists():  # keep a reason given before
            mark_unfinished(self.directory)
        (self.directory / "manifest.json").unlink(missing_ok=True)
        self.tables = {
            name: TableWriter(self.directory / f"{name}.parquet", name, rows_per_group)
            for name in COLUMNS
        }

    def __getitem__(self, table: str) -> TableWriter:
        return self.tables[table]

    def close(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Finish every table, then write the manifest (with each table's row count
        under ``rows``): the run is complete. Returns the manifest."""
        for writer in self.tables.values():
            writer.close()
        manifest["rows"] = {name: writer.written for name, writer in self.tables.items()}
        (self.directory / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        (self.directory / UNFINISHED).unlink(missing_ok=True)
        return manifest

    def abandon(self) -> None:
        """Close every table's file, write no manifest: the directory stays unfinished."""
        for writer in self.tables.values():
            writer.abandon()


def _manifest(path: Path) -> dict[str, Any]:
    """``manifest.json`` read; a ValueError naming it unless it is a JSON object whose
    ``params`` (if any) are sections of ``key: value``, as :class:`RunWriter` writes."""
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a JSON object (a run's manifest is)")
    params = manifest.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{path}: params is not an object of sections (section: {{key: value}})")
    return manifest


def empty(table: str) -> pd.DataFrame:
    return pd.DataFrame({column: [] for column in COLUMNS[table]})


@dataclass
class RunTables:
    """All tables of one run, as DataFrames, plus the manifest."""

    manifest: dict[str, Any] = field(default_factory=dict)
    commands: pd.DataFrame = field(default_factory=lambda: empty("commands"))
    published: pd.DataFrame = field(default_factory=lambda: empty("published"))
    handled: pd.DataFrame = field(default_factory=lambda: empty("handled"))
    final: pd.DataFrame = field(default_factory=lambda: empty("final"))
    user_streams: pd.DataFrame = field(default_factory=lambda: empty("user_streams"))
    deliveries: pd.DataFrame = field(default_factory=lambda: empty("deliveries"))
    phones: pd.DataFrame = field(default_factory=lambda: empty("phones"))
    samples: pd.DataFrame = field(default_factory=lambda: empty("samples"))
    faults: pd.DataFrame = field(default_factory=lambda: empty("faults"))
    escrows: pd.DataFrame = field(default_factory=lambda: empty("escrows"))
    ledger: pd.DataFrame = field(default_factory=lambda: empty("ledger"))
    risk: pd.DataFrame = field(default_factory=lambda: empty("risk"))
    lost_entries: pd.DataFrame = field(default_factory=lambda: empty("lost_entries"))

    @classmethod
    def table_names(cls) -> list[str]:
        """The tables' names (a subclass's other fields, a Run's ``path``, are not)."""
        return [f.name for f in fields(cls) if f.name in COLUMNS]

    def save(self, directory: str | Path) -> Path:
        """Write every table and the manifest to ``directory``. Tables saved over a
        simulated run are no longer that run: its cache key is removed first."""
        from simulations.drivers import cache

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        cache.forget(out)
        for name in self.table_names():
            frame: pd.DataFrame = getattr(self, name)
            missing = set(COLUMNS[name]) - set(frame.columns)
            if missing:
                raise ValueError(f"table {name} lacks columns {sorted(missing)}")
            frame[COLUMNS[name]].to_parquet(out / f"{name}.parquet", index=False)
        (out / "manifest.json").write_text(json.dumps(self.manifest, indent=2, default=str))
        (out / UNFINISHED).unlink(missing_ok=True)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> RunTables:
        """The run in ``directory``; :class:`UnfinishedRun` if it did not finish,
        ``FileNotFoundError`` if it is no run directory or lacks a table."""
        path = Path(directory)
        if (marker := path / UNFINISHED).exists():
            raise UnfinishedRun(
                f"{path} holds an unfinished run ({marker.read_text().strip()}):"
                " no complete tables to read; simulate it again"
            )
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{path} is not a run directory (no manifest.json)")
        run = cls(manifest=_manifest(manifest_path))
        for name in cls.table_names():
            file = path / f"{name}.parquet"
            if not file.exists() and name == "risk":
                continue  # runs from before the analytics group: an empty table
            if not file.exists():
                raise FileNotFoundError(f"{path} lacks {name}.parquet")
            setattr(run, name, pd.read_parquet(file))
        return run
