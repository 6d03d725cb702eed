"""Rows as tables of their declared schemas, and the batches of them a run stages.

`BatchWriter` stages the rows of one batch of videos for the store to publish (see
`pipeline.store`). Every table written is checked against its declared schema first.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.ledger import ATTEMPTS, ATTEMPTS_SCHEMA, UNITS
from schemas.tables import EMBEDDING_TABLES, check_table, table_schema


def rows_to_table(table: str, rows: list[dict[str, Any]], embedding_dim: int | None) -> pa.Table:
    """Build a pyarrow table with exactly the declared schema from row dicts.

    The rows are converted in one call, as a struct array (a key a row lacks is null), not a
    column at a time: the driver converts each video's rows as it records them (`pipeline.job`),
    and pyarrow's cost a call, not a value, is most of that for a video's few rows.
    """
    schema = table_schema(table, embedding_dim)
    plain = _plain_struct(table, embedding_dim)
    data = pa.RecordBatch.from_struct_array(pa.array(rows, type=plain))
    if len(plain) < len(schema):
        embeddings = _embedding_array([row.get("embedding") for row in rows], embedding_dim or 0)
        data = data.append_column(schema.field("embedding"), embeddings)
    data = pa.Table.from_batches([data.replace_schema_metadata(schema.metadata)])
    check_table(table, data, embedding_dim)
    return data


@functools.lru_cache(maxsize=None)
def _plain_struct(table: str, embedding_dim: int | None) -> pa.StructType:
    """The columns of `table` but its embedding (converted apart, from numpy) as a struct type."""
    return pa.struct([field for field in table_schema(table, embedding_dim) if field.name != "embedding"])


def _embedding_array(values: list[np.ndarray | None], dim: int) -> pa.Array:
    # stack into one float32 buffer: millions of Python floats would dominate write time
    mask = np.array([v is None for v in values], dtype=bool)
    flat = np.zeros((len(values), dim), dtype=np.float32)
    for i, v in enumerate(values):
        if v is not None:
            if v.shape != (dim,):
                raise ValueError(f"embedding of size {v.shape} where the run's size is {dim}")
            flat[i] = v
    storage = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), dim)
    if mask.any():
        storage = pa.FixedSizeListArray.from_arrays(
            storage.values, dim, mask=pa.array(mask)
        )
    return storage


def _with_embeddings(table: str, data: pa.Table, dim: int | None) -> pa.Table:
    """`data` of `table` with its embedding column of size `dim`, null where it has none: a video
    converted before its batch's size was known (the first of the batch, its embed stage failed)."""
    if not dim or table not in EMBEDDING_TABLES or "embedding" in data.column_names:
        return data
    kind = pa.list_(pa.float32(), dim)
    return data.append_column(pa.field("embedding", kind), pa.nulls(data.num_rows, kind))


class BatchWriter:
    """Rows of one batch of videos, per table, staged as Parquet files for `Store.publish`."""

    def __init__(self, store: Any, run_id: str, run_date: str, rows_per_file: int = 50_000):
        self.store = store
        self.run_id = run_id
        self.run_date = run_date
        self.rows_per_file = rows_per_file
        self.embedding_dim: int | None = None
        self._tables: dict[str, list[pa.Table]] = {}
        self._attempts: list[dict[str, Any]] = []

    def next_batch(self) -> "BatchWriter":
        """An empty writer for the next batch, with this one's settings and embedding size."""
        writer = BatchWriter(self.store, self.run_id, self.run_date, self.rows_per_file)
        writer.embedding_dim = self.embedding_dim
        return writer

    @property
    def pending(self) -> bool:
        """Whether rows are queued."""
        return bool(self._tables) or bool(self._attempts)

    def add(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Queue rows of one table for this batch."""
        self.add_tables(self.converted({table: rows}))

    def converted(self, rows: dict[str, list[dict[str, Any]]]) -> dict[str, pa.Table]:
        """Rows per table as tables of their declared schemas: an error (ValueError, TypeError,
        pyarrow's) where a value does not fit, before any is queued; a table with no rows is left out."""
        return {table: rows_to_table(table, table_rows, self.embedding_dim if table in EMBEDDING_TABLES else None)
                for table, table_rows in rows.items() if table_rows}

    def add_tables(self, tables: dict[str, pa.Table]) -> None:
        """Queue `converted` rows for this batch."""
        for table, data in tables.items():
            self._tables.setdefault(table, []).append(data)

    def attempted(self, video_id: str, units: frozenset[str]) -> None:
        """Record that this run recomputed `units` of a video, whether or not they gave rows
        (published with the batch: see `pipeline.ledger.ATTEMPTS`)."""
        self._attempts.append({"video_id": video_id, "run_id": self.run_id,
                               "units": [unit for unit in UNITS if unit in units]})

    def stage(self, batch: int, empty_tables: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Write the queued rows under staging; returns the file records for the batch manifest.

        `empty_tables` get one empty file each when they have no rows, so a dataset reader
        finds every table's schema even before any row exists.
        """
        files = []  # (rows, table, file name)
        for table in list(self._tables) + [t for t in empty_tables if t not in self._tables]:
            dim = self.embedding_dim if table in EMBEDDING_TABLES else None
            data = (pa.concat_tables([_with_embeddings(table, part, dim) for part in self._tables[table]])
                    if table in self._tables else table_schema(table, dim).empty_table())
            starts = range(0, data.num_rows, self.rows_per_file) or range(1)
            for n, start in enumerate(starts):  # (a video's tables in one: a row group is not one per video)
                chunk = data.slice(start, self.rows_per_file).combine_chunks()
                files.append((chunk, table, f"part-{self.run_id}-{batch:05d}-{n:02d}.parquet"))
        if self._attempts:  # a row a video: one file a batch
            files.append((pa.Table.from_pylist(self._attempts, schema=ATTEMPTS_SCHEMA), ATTEMPTS,
                          f"part-{self.run_id}-{batch:05d}-00.parquet"))
        self._tables, self._attempts = {}, []
        return self.store.stage_files(files, self.run_date, self.run_id)
