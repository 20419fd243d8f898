"""Read texts out of a SQLite file: read-only, names checked against the schema, in chunks.

SQLite cannot bind table or column names as parameters, so names are checked against `sqlite_master` /
`PRAGMA table_info` and then quoted; user queries run under an authorizer that allows reading only.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import DataError, permission_denied

# What a user query may do: read tables and call functions. Anything else (writes, ATTACH, PRAGMA
# that changes state, CREATE ...) is refused by SQLite itself before it runs.
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                    getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


@dataclass(frozen=True)
class TextSource:
    database: str
    table: str | None
    text_column: str
    query: str | None
    limit: int | None
    chunk_rows: int = 2000

    def describe(self) -> str:
        what = f"query {self.query!r}" if self.query else f"table {self.table!r}, column {self.text_column!r}"
        return f"{self.database}: {what}"


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def connect_readonly(database: str) -> sqlite3.Connection:
    path = Path(database)
    try:
        if not path.exists():
            raise DataError(f"data.database: file not found: {database}")
        if path.is_dir():
            raise DataError(f"data.database: {database} is a directory, not a SQLite file")
        with open(path, "rb") as f:
            header = f.read(16)
    except PermissionError:
        raise permission_denied("data.database", path) from None
    except OSError as e:
        raise DataError(f"data.database: cannot read {database}: {e.strerror}") from None
    if header != b"SQLite format 3\x00":
        raise DataError(f"data.database: {database} is not a SQLite database (bad file header)")
    try:
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=3)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as e:
        raise DataError(f"data.database: cannot open {database}: {_explain(e)}") from None
    return conn


def _explain(e: sqlite3.Error) -> str:
    msg = str(e)
    if "locked" in msg:
        return f"{msg} (another process holds a write lock; wait for it or copy the file)"
    if "malformed" in msg or "not a database" in msg:
        return f"{msg} (the file is damaged or truncated; copy it again from its source)"
    return msg


def check_source(src: TextSource) -> None:
    """Fail early, with the name of what is wrong, before anything is written."""
    conn = connect_readonly(src.database)
    try:
        if src.query:
            _check_query(conn, src.query)
        else:
            _check_table_column(conn, src.table, src.text_column)
    finally:
        conn.close()


def check_rows(src: TextSource, sample_rows: int = 1000) -> None:
    """Read the first rows as prepare will, so that a column of numbers or BLOBs, text that is not UTF-8
    or a table with nothing usable in it fails before anything is written. Past the sample it reads on
    only until one usable text turns up (a table without any is read to its end, as prepare would)."""
    texts = iter_texts(src)
    rows, usable = 0, False
    try:
        for text in texts:
            rows += 1
            usable = usable or bool(text and text.strip())  # what prepare keeps
            if usable and rows >= sample_rows:
                return
    finally:
        texts.close()
    if not usable:
        raise DataError(f"data: no usable rows in {src.describe()} ({rows} read, all NULL, empty or whitespace)")


def _check_table_column(conn: sqlite3.Connection, table: str, column: str) -> None:
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")]
    if table not in tables:
        raise DataError(f"data.table: no table {table!r} in the database; tables: {', '.join(tables) or 'none'}")
    columns = [r[1] for r in conn.execute(f"PRAGMA table_info({quote_identifier(table)})")]
    if column not in columns:
        raise DataError(f"data.text_column: table {table!r} has no column {column!r}; columns: {', '.join(columns)}")


def _deny_writes(action, arg1, arg2, dbname, source):
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def _check_query(conn: sqlite3.Connection, query: str) -> None:
    q = query.strip().rstrip(";").strip()
    if not sqlite3.complete_statement(q + ";") or ";" in _strip_strings(q):
        raise DataError("data.query: must be exactly one SELECT statement")
    if q.split(None, 1)[0].upper() not in ("SELECT", "WITH"):
        raise DataError("data.query: must be a read-only SELECT (or WITH ... SELECT) statement")
    conn.set_authorizer(_deny_writes)
    try:
        # EXPLAIN compiles the query as written (a WITH ... DELETE included) without running it, so the
        # authorizer sees what it would do; the wrapped form below only accepts a SELECT.
        conn.execute(f"EXPLAIN {q}")
        cur = conn.execute(f"SELECT * FROM ({q}) LIMIT 0")
    except sqlite3.DatabaseError as e:
        if "not authorized" in str(e):
            raise DataError("data.query: only reading is allowed (the query tries to write or change the database)") from None
        raise DataError(f"data.query: {_explain(e)}") from None
    finally:
        conn.set_authorizer(None)
    if not cur.description:
        raise DataError("data.query: returns no columns")


def _strip_strings(sql: str) -> str:
    """The query without its quoted literals, to look for statement separators outside them."""
    out, quote = [], None
    for ch in sql:
        if quote:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        else:
            out.append(ch)
    return "".join(out)


def _select_sql(conn: sqlite3.Connection, src: TextSource) -> str:
    """A SELECT of (typeof(text), text as raw bytes), so types and encodings are checked here, not guessed."""
    if src.query:
        inner = src.query.strip().rstrip(";")
        first = conn.execute(f"SELECT * FROM ({inner}) LIMIT 0").description[0][0]
        col, frm = f"q.{quote_identifier(first)}", f"({inner}) AS q"
    else:
        col, frm = quote_identifier(src.text_column), quote_identifier(src.table)
    sql = f"SELECT typeof({col}), CAST({col} AS BLOB) FROM {frm}"
    return sql + (f" LIMIT {int(src.limit)}" if src.limit else "")


def iter_texts(src: TextSource) -> Iterator[str | None]:
    """Yield each row's text (None for NULL), in the table's natural order, chunk by chunk."""
    check_source(src)
    conn = connect_readonly(src.database)
    try:
        conn.set_authorizer(_deny_writes)
        row_number = 0
        try:
            cur = conn.execute(_select_sql(conn, src))
        except sqlite3.DatabaseError as e:
            raise _read_error(e, src, row_number) from None
        while True:
            try:
                rows = cur.fetchmany(src.chunk_rows)
            except sqlite3.DatabaseError as e:
                raise _read_error(e, src, row_number) from None
            if not rows:
                return
            for kind, raw in rows:
                row_number += 1
                yield _decode(kind, raw, row_number, src)
    finally:
        conn.close()


def _read_error(e: sqlite3.DatabaseError, src: TextSource, row_number: int) -> DataError:
    """Errors SQLite raises only while running the statement: the read-only authorizer refuses some
    functions (load_extension, ...) at execution, and a damaged page shows where it is read."""
    if "not authorized" in str(e):
        return DataError("data.query: only reading is allowed (SQLite refused a function or statement the "
                         "query runs, e.g. load_extension)")
    key = "data.query" if src.query and "malformed" not in str(e) else "data.database"
    return DataError(f"{key}: reading {src.describe()} failed at row {row_number + 1}: {_explain(e)}")


def _decode(kind: str, raw: bytes | None, row_number: int, src: TextSource) -> str | None:
    if kind == "null":
        return None
    if kind != "text":
        what = "BLOBs (binary data)" if kind == "blob" else f"{kind} values, not text"
        key = "data.query" if src.query else "data.text_column"
        raise DataError(f"{key}: row {row_number} of {src.describe()} holds {what}; "
                        "choose a text column, or CAST it in data.query")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data: row {row_number} of {src.describe()} is not valid UTF-8 "
                        f"(byte {raw[e.start]:#04x} at offset {e.start}); fix the row or filter it out in data.query") from None
