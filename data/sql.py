"""`python -m data write --from-sql QUERY --db URL`: the rows of a query, read as a manifest's rows
(`items_from_rows`: path, label or labels, split, mask; other columns go to KEY.json), from any
database SQLAlchemy reaches. `sqlite:///FILE` needs nothing more; a bare `postgresql://` means
psycopg 3, the driver shardtrain installs.

The password (in the URL or its query string) never leaves this module: the URL is recorded and
shown without it, and database messages are scrubbed of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from datetime import date, datetime, time
from decimal import Decimal
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus

from data.errors import UserError
from data.sources import Item, items_from_rows

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Connection, Engine, Result

STREAM_ROWS = 1000  # rows per fetch from a server-side cursor: memory stays at the items themselves
CONNECT_TIMEOUT_S = 10  # a host that drops packets would otherwise hang for minutes
EXAMPLES = "sqlite:///inspections.db, postgresql://USER@HOST:PORT/DB"
# What SQLAlchemy's text() takes for a bind parameter (`:name`); escaped so the query reaches the
# database exactly as written (`'10 :30'`), while text() still doubles `%` for psycopg.
BIND = re.compile(r"(?<![:\w\\]):(\w+)(?![:\w])")


def from_sql(query: str, url: str) -> tuple[list[Item], dict]:
    """The items of `query`'s rows in query order, and the origin for dataset.json's created_by:
    the query, the URL without its password, the row count and a sha256 of the rows, so a rerun
    can tell whether the data changed. Relative paths resolve against the working directory."""
    from sqlalchemy.exc import DBAPIError

    db = _parse(url)
    shown = _public(db)
    engine = _engine(db, shown)
    digest = hashlib.sha256()
    try:
        with _connect(engine, db, shown) as conn:
            try:
                result = _execute(conn, query)
                columns = list(result.keys())
                _check_columns(columns, query)
                items = items_from_rows(_rows(result, columns, digest), os.getcwd(), "--from-sql")
            except DBAPIError as e:  # raised by the first fetch or by any later one
                raise UserError(f"--from-sql: the query failed: {_cause(e, db)} ({_named(query)})") from None
    finally:
        engine.dispose()
    if not items:
        raise UserError(f"--from-sql: the query returned no rows, nothing to write ({_named(query)})")
    origin = {"query": query, "url": shown, "rows": len(items), "sha256": digest.hexdigest()}
    return items, {"sql": origin}


def _parse(url: str) -> URL:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        # Greedy: everything from the user's ":" to the last "@" goes, whatever the password holds.
        hidden = re.sub(r"^([\w+.-]+://[^:/@]*):.*@", r"\1@", url)
        raise UserError(
            f"--db {hidden}: not a SQLAlchemy URL (expected {EXAMPLES}; a password's special "
            "characters need percent-encoding, @ as %40)"
        ) from None


def _public(db: URL) -> str:
    """The URL as recorded and shown: no password, neither in it nor in its query string."""
    from sqlalchemy.engine import URL

    # URL.set(password=None) leaves the password as it is: None there means "unchanged".
    query = {k: v for k, v in db.query.items() if "password" not in k.lower()}
    bare = URL.create(db.drivername, db.username, None, db.host, db.port, db.database, query)
    return bare.render_as_string(hide_password=False)


def _secrets(db: URL) -> list[str]:
    values = [db.password] if db.password else []
    for key, value in db.query.items():
        if "password" in key.lower():
            values += [value] if isinstance(value, str) else list(value)
    # As given and as a message may quote it, longest first so no part of one is left behind.
    forms = {f for v in values if v for f in (v, quote(v, safe=""), quote_plus(v))}
    return sorted(forms, key=len, reverse=True)


def _engine(db: URL, shown: str) -> Engine:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    from sqlalchemy.pool import NullPool

    if db.drivername in ("postgresql", "postgres"):  # SQLAlchemy's default is psycopg2, not installed
        db = db.set(drivername="postgresql+psycopg")
    backend = db.get_backend_name()
    file = db.database if backend == "sqlite" and db.database not in (None, "", ":memory:") else None
    if file and not file.startswith("file:") and not os.path.isfile(file):
        # sqlite would create an empty file here and then find no table in it
        raise UserError(
            f"--db {shown}: no database file {os.path.abspath(file)} (sqlite:///relative.db is "
            "relative to the working directory, sqlite:////abs/path.db absolute)"
        )
    args = {}
    if backend == "postgresql" and "connect_timeout" not in db.query:
        args["connect_timeout"] = CONNECT_TIMEOUT_S
    try:
        return create_engine(db, poolclass=NullPool, connect_args=args)
    except NoSuchModuleError:
        raise UserError(
            f"--db {shown}: SQLAlchemy has no database {db.drivername!r} (expected {EXAMPLES})"
        ) from None
    except ImportError as e:
        raise UserError(
            f"--db {shown}: its driver is not installed ({e}): pip install it, or use postgresql:// "
            "(psycopg 3, installed with shardtrain) or sqlite:///"
        ) from None
    except (ArgumentError, TypeError, ValueError) as e:
        raise UserError(f"--db {shown}: {_scrub(str(e), db)} (expected {EXAMPLES})") from None


def _connect(engine: Engine, db: URL, shown: str) -> Connection:
    from sqlalchemy.exc import DBAPIError

    try:
        return engine.connect()
    except DBAPIError as e:
        raise UserError(
            f"--db {shown}: cannot connect: {_cause(e, db)} (check host, port, database, user and "
            "password; a password can come from ~/.pgpass instead of the URL)"
        ) from None


def _execute(conn: Connection, query: str) -> Result:
    from sqlalchemy import text

    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")  # a pasted DELETE ... RETURNING changes nothing
    # A server-side cursor where the driver has one (psycopg: DECLARE ... CURSOR), read in batches;
    # postgresql_readonly: a read-only transaction, so the query cannot change the database.
    streaming = conn.execution_options(stream_results=True, yield_per=STREAM_ROWS, postgresql_readonly=True)
    statement = query.strip().rstrip(";")  # one statement: a trailing ";" is no part of it
    return streaming.execute(text(BIND.sub(r"\\:\1", statement)))


def _check_columns(columns: list[str], query: str) -> None:
    found = ", ".join(columns) or "none"
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise UserError(
            f"--from-sql: columns {', '.join(twice)} appear twice (give each its own name with AS)"
        )
    if "path" not in columns:
        raise UserError(
            f"--from-sql: the query's rows have no path column (columns found: {found}); name the image "
            f"file's column path, e.g. SELECT file_name AS path, ... ({_named(query)})"
        )
    if "label" not in columns and "labels" not in columns:
        raise UserError(
            f"--from-sql: the query's rows have no label or labels column (columns found: {found}); name "
            f"the class column label, e.g. SELECT ..., verdict AS label ({_named(query)})"
        )


def _rows(result: Result, columns: list[str], digest) -> Iterator[tuple[str, dict]]:
    """Each row as a manifest row of plain JSON values, hashed as it passes (query order)."""
    digest.update(_line(columns))
    for n, row in enumerate(result, start=1):
        values = [_plain(v) for v in row]
        digest.update(_line(values))
        record = dict(zip(columns, values))
        if "labels" in record and record["labels"] is None:
            record["labels"] = ""  # NULL, as an aggregate over no defects gives: no defects, a good part
        yield f"--from-sql row {n}", record


def _line(values: list) -> bytes:
    return json.dumps(values, sort_keys=True, default=str).encode() + b"\n"


def _plain(value):
    """A database value as JSON can hold it, for KEY.json and the rows' sha256."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Decimal):  # NUMERIC: a whole number stays one; NaN and infinity as text
        if not value.is_finite():
            return str(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, list | tuple):  # PostgreSQL arrays
        return [_plain(v) for v in value]
    if isinstance(value, dict):  # json / jsonb
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)  # UUID, intervals, network addresses, ...


def _cause(error: Exception, db: URL) -> str:
    """The driver's own message, without SQLAlchemy's wrapping: its first line, plus the next where
    the first only introduces it ("Multiple connection attempts failed. All failures were:")."""
    lines = [line.strip() for line in str(getattr(error, "orig", None) or error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return _scrub(text, db)


def _scrub(text: str, db: URL) -> str:
    for secret in _secrets(db):
        text = text.replace(secret, "***")
    return text


def _named(query: str) -> str:
    return "query: " + " ".join(query.split())  # on the error's one line
