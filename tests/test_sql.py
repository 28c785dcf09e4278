"""`python -m data write --from-sql QUERY --db URL`: rows of a real SQLite file and of a real
PostgreSQL 15 server become shards; the password is recorded nowhere; bad input is one error line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator

import pytest

from data.__main__ import main
from tests.conftest import free_port
from tests.test_write import make_folder

PG_BIN = "/usr/lib/postgresql/15/bin"
PASSWORD = "Tq7-never-recorded-9xK"  # the role's: searched for in everything a write leaves
ADMIN_PASSWORD = "admin-Wm3-setup-only"


def _ok(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{command[-1]}: {done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL 15 server on 127.0.0.1 with scram-sha-256 password auth, a role `inspector`
    and its database `quality`; its URL, with the password. One per module: about a second."""
    if not os.path.isfile(f"{PG_BIN}/pg_ctl"):
        pytest.skip(f"PostgreSQL 15 binaries not found in {PG_BIN} (apt-get install postgresql-15)")
    import psycopg

    # initdb refuses root: the server runs as the postgres OS user, in a directory it owns.
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = tempfile.mkdtemp(prefix="pg-")
    if as_postgres:
        shutil.chown(root, "postgres", "postgres")
    data, pwfile, port = os.path.join(root, "data"), os.path.join(root, "pw"), free_port()
    with open(pwfile, "w") as f:
        f.write(ADMIN_PASSWORD)
    if as_postgres:
        shutil.chown(pwfile, "postgres", "postgres")
    pg_ctl = [*as_postgres, f"{PG_BIN}/pg_ctl", "-D", data]
    try:
        auth = ["--auth-host=scram-sha-256", "--auth-local=scram-sha-256", f"--pwfile={pwfile}"]
        initdb = [f"{PG_BIN}/initdb", "-D", data, "-U", "admin", *auth, "-E", "UTF8", "--no-sync"]
        _ok([*as_postgres, *initdb])
        # Unix socket inside the directory, TCP on 127.0.0.1 only; fsync off: a test server.
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off"
        _ok([*pg_ctl, "-w", "-t", "30", "-l", f"{root}/log", "-o", options, "start"])
        admin = f"postgresql://admin:{ADMIN_PASSWORD}@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE inspector LOGIN PASSWORD '{PASSWORD}'")
            conn.execute("CREATE DATABASE quality OWNER inspector")
        yield f"postgresql://inspector:{PASSWORD}@127.0.0.1:{port}/quality"
    finally:
        subprocess.run([*pg_ctl, "stop", "-m", "fast"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _images(root, per_class: int = 4) -> list[tuple[str, str]]:
    """(path relative to root, class) of tiny JPEGs and PNGs in root/images/{good,scratch}/."""
    make_folder(root / "images", classes=("good", "scratch"), per_class=per_class, size=(24, 16))
    return [(str(p.relative_to(root)), p.parent.name) for p in sorted((root / "images").rglob("*.*"))]


def _samples(out) -> list[dict]:
    """Every sample's KEY.json and KEY.cls, read back with plain tarfile."""
    found = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                found.setdefault(key, {"shard": shard.name})[ext] = tar.extractfile(member).read()
    return [{**json.loads(s["json"]), "cls": int(s["cls"]), "shard": s["shard"]} for s in found.values()]


def _write(query: str, url: str, out, *more: str) -> int:
    return main(["write", "--from-sql", query, "--db", url, str(out), "--workers", "1", *more])


def test_sqlite_rows_become_shards_with_the_query_and_a_hash_of_the_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths from SQL resolve against the working directory
    files = _images(tmp_path)
    db = sqlite3.connect(tmp_path / "quality.db")
    columns = "path TEXT, label TEXT, split TEXT, line INT, camera TEXT, shot_at TIMESTAMP"
    db.execute(f"CREATE TABLE inspections ({columns})")
    rows = [  # every other path absolute
        (p if i % 2 else str(tmp_path / p), c, "val" if i % 4 == 0 else "train", i % 3, f"cam{i % 2}",
         f"2024-05-0{1 + i % 9} 08:{i:02d}:00")
        for i, (p, c) in enumerate(files)
    ]  # fmt: skip
    db.executemany("INSERT INTO inspections VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    query = "SELECT * FROM inspections ORDER BY shot_at"
    url = "sqlite:///quality.db"

    assert _write(query, url, tmp_path / "shards") == 0
    index = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    origin = index["created_by"]["sql"]
    assert {k: origin[k] for k in ("query", "url", "rows")} == {"query": query, "url": url, "rows": len(rows)}
    samples = _samples(tmp_path / "shards")
    assert len(samples) == len(rows) and index["classes"] == ["good", "scratch"]
    for s in samples:  # every column but label and split is in KEY.json, as the database has it
        row = next(r for r in rows if r[0] == s["path"])
        assert (s["line"], s["camera"], s["shot_at"]) == row[3:]
        assert index["classes"][s["cls"]] == row[1] and s["shard"].startswith(row[2])
    assert sum(s["shard"].startswith("val") for s in samples) == 2

    # The same rows give the same hash; one changed value gives another.
    assert _write(query, url, tmp_path / "again") == 0
    again = json.loads((tmp_path / "again" / "dataset.json").read_text())["created_by"]["sql"]
    assert again["sha256"] == origin["sha256"]
    db.execute("UPDATE inspections SET camera = 'cam9' WHERE line = 2")
    db.commit()
    db.close()
    assert _write(query, url, tmp_path / "shards", "--overwrite") == 0
    changed = json.loads((tmp_path / "shards" / "dataset.json").read_text())["created_by"]["sql"]
    assert changed["sha256"] != origin["sha256"] and changed["rows"] == len(rows)


def test_sqlite_labels_null_is_a_good_part_and_percent_and_colon_reach_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = _images(tmp_path, per_class=3)
    db = sqlite3.connect(tmp_path / "quality.db")
    db.execute("CREATE TABLE parts (file TEXT, defects TEXT, note TEXT)")
    db.executemany(
        "INSERT INTO parts VALUES (?, ?, ?)",
        [(p, None if c == "good" else "scratch;dent", "at 10 :30, 50%") for p, c in files],
    )
    db.commit()
    db.close()
    # `:30` is no bind parameter and `%` no placeholder: the query reaches sqlite as written.
    query = "SELECT file AS path, defects AS labels, note FROM parts WHERE note LIKE '% :30, 50%';"
    assert _write(query, "sqlite:///quality.db", tmp_path / "out") == 0
    index = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert index["classes"] == ["dent", "good", "scratch"]
    by_class = {index["classes"][s["cls"]]: s for s in _samples(tmp_path / "out")}
    assert by_class["good"]["labels"] == "" and by_class["scratch"]["labels"] == "scratch;dent"


def test_postgresql_write_records_the_url_without_its_password_anywhere(tmp_path, postgres, caplog, capfd):
    import psycopg

    files = _images(tmp_path, per_class=18)  # 36 rows
    with psycopg.connect(postgres) as conn:
        conn.execute(
            "CREATE TABLE inspections (id SERIAL, path TEXT, verdict TEXT, line INT, shot_at TIMESTAMPTZ, "
            "width_mm NUMERIC(6, 2), tags TEXT[])"
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO inspections (path, verdict, line, shot_at, width_mm, tags) "
                "VALUES (%s, %s, %s, '2024-05-01 08:00+00'::timestamptz + %s * interval '1 minute', %s, %s)",
                [(str(tmp_path / p), c, i % 4, i, 12.5 + i, ["a", c]) for i, (p, c) in enumerate(files)],
            )
    caplog.set_level(logging.DEBUG)
    query = "SELECT path, verdict AS label, line, shot_at, width_mm, tags FROM inspections ORDER BY id"

    assert _write(query, postgres, tmp_path / "out") == 0
    text = (tmp_path / "out" / "dataset.json").read_text()
    origin = json.loads(text)["created_by"]["sql"]
    assert origin["url"] == postgres.replace(f":{PASSWORD}@", "@") and origin["rows"] == 36
    assert len(origin["sha256"]) == 64 and origin["query"] == query
    samples = _samples(tmp_path / "out")
    first = next(s for s in samples if s["shot_at"] == "2024-05-01T08:00:00+00:00")
    assert (first["line"], first["width_mm"], first["tags"]) == (0, 12.5, ["a", first["path"].split("/")[-2]])

    out, err = capfd.readouterr()
    assert "wrote 36 samples" in out
    left = [text, out, err, caplog.text] + [
        p.read_bytes().decode("latin-1") for p in (tmp_path / "out").iterdir()
    ]
    assert not [t for t in left if PASSWORD in t]


def _closed_port_url() -> str:
    return f"postgresql://inspector:{PASSWORD}@127.0.0.1:{free_port()}/quality"


def _wrong_password(postgres: str) -> str:
    return postgres.replace(PASSWORD, "Wrong-pw-4Xv")


@pytest.fixture
def quality_db(tmp_path) -> str:
    """A SQLite file with one row whose image exists, as sqlite:///ABS_PATH."""
    _images(tmp_path, per_class=1)
    db = sqlite3.connect(tmp_path / "q.db")
    db.execute("CREATE TABLE parts (file TEXT, label TEXT)")
    db.execute("INSERT INTO parts VALUES (?, 'good')", (str(tmp_path / "images/good/img00.png"),))
    db.commit()
    db.close()
    return f"sqlite:///{tmp_path / 'q.db'}"


ANY = "SELECT 1 AS path"  # never runs: the URL fails first


@pytest.mark.parametrize(
    ("query", "url", "expected"),
    [
        ("SELECT * FROM nope", "sqlite", ["query failed: no such table: nope", "query: SELECT * FROM nope"]),
        ("SELECT file, label FROM parts", "sqlite", ["no path column", "columns found: file, label"]),
        ("SELECT file AS path, label FROM parts WHERE 0", "sqlite", ["returned no rows"]),
        (ANY, "sqlite:////no/such/dir/q.db", ["no database file /no/such/dir/q.db"]),
        ("SELECT * FROM nope", "postgres", ['relation "nope" does not exist', "query: SELECT * FROM nope"]),
        (ANY, "closed port", ["cannot connect", "Connection refused", "inspector@127.0.0.1"]),
        (ANY, "wrong password", ['password authentication failed for user "inspector"']),
        (ANY, f"postgresql+psycopg2://u:{PASSWORD}@h/db", ["postgresql+psycopg2://u@h/db", "psycopg2"]),
        (ANY, f"postgresql://u:{PASSWORD}@h:port/db", ["postgresql://u@h:port/db: not a SQLAlchemy URL"]),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, request, capsys, query, url, expected):
    url = {
        "sqlite": lambda: request.getfixturevalue("quality_db"),
        "postgres": lambda: request.getfixturevalue("postgres"),
        "closed port": _closed_port_url,
        "wrong password": lambda: _wrong_password(request.getfixturevalue("postgres")),
    }.get(url, lambda: url)()
    out = tmp_path / "out"
    assert _write(query, url, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(e in err for e in expected), err
    assert PASSWORD not in err and "Wrong-pw-4Xv" not in err
    assert not (out / "dataset.json").exists()


def test_the_real_command_exits_2_naming_the_url_without_its_password(tmp_path, postgres):
    url = _wrong_password(postgres)
    command = [
        sys.executable,
        "-m",
        "data",
        "write",
        "--from-sql",
        "SELECT 1",
        "--db",
        url,
        str(tmp_path / "o"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: --db {url.replace(':Wrong-pw-4Xv@', '@')}: cannot connect")
    assert "Wrong-pw-4Xv" not in done.stderr and not (tmp_path / "o").exists()
