"""Names: what a database, table or column may be called, and how chunk tables are named."""

from __future__ import annotations

import re
from typing import Optional

from wmgr.dbs.errors import InvalidArgument

NAME = re.compile(r"[A-Za-z_][0-9A-Za-z_]*\Z")
# MySQL's limit for database, table, column and index names.
MAX_NAME = 64

# Never listed, created, dropped or written through this API (the xrootd bookkeeping database,
# whose name is configurable, is added by the domain).
SYSTEM_DATABASES = frozenset({"mysql", "information_schema", "performance_schema", "sys"})


def _check(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME.match(name) or len(name) > MAX_NAME:
        raise InvalidArgument(f"{what} name is invalid: {name!r}")
    return name


def check_database(name: str) -> str:
    return _check(name, "Database")


def check_table(name: str) -> str:
    return _check(name, "Table")


def check_column(name: str) -> str:
    return _check(name, "Column")


def chunk_table(table: str, chunk_id: int) -> str:
    return f"{table}_{chunk_id}"


def overlap_table(table: str, chunk_id: int) -> str:
    return f"{table}FullOverlap_{chunk_id}"


def chunk_of(table: str, name: str) -> Optional[tuple[int, bool]]:
    """(chunk id, is the overlap table) if `name` is a chunk or overlap table of `table`."""
    m = re.fullmatch(re.escape(table) + r"(FullOverlap)?_([0-9]+)", name)
    if m is None:
        return None
    return int(m.group(2)), m.group(1) is not None


def parse_chunk_id(text: str) -> int:
    text = text.strip() if isinstance(text, str) else ""
    if not text.isdigit() or not text.isascii():
        raise InvalidArgument(f"chunkId must be a non-negative integer: {text!r}")
    value = int(text)
    if value >= 2 ** 31:
        raise InvalidArgument(f"chunkId is too large: {text!r}")
    return value
