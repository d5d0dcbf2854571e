"""Qserv table loads: `POST /dbs/<db>/tables/<t>/data` with a 100 MB table file, plain and gzip.

For each backend (SQLite always; MariaDB when 127.0.0.1:3306 answers) and each format, rows per
second through wmgr (the whole request: TLS upload of the multipart body, spooling, parsing,
inserting; timed from sending the request to the end of the answer), as a ratio of the backend's
own bulk load of the same file in the same run:
- SQLite: this process reads the file (gzip.open for the .gz) and inserts its rows with
  `executemany` in one transaction into a fresh database file with the same table;
- MariaDB: the `mariadb` client's `LOAD DATA LOCAL INFILE` of the file (for the .gz: `zcat` piped
  into it, LOAD DATA reading /dev/stdin).
While wmgr loads, this process samples the daemon's RSS (psutil) and sends `GET /dbs/<db>/tables`
over a second connection every 50 ms: it prints the RSS growth and those requests' latency.

`--smoke`: a 2 MB file, for CI. Target (issue 12): ratio >= 50 %, RSS growth of a few MB.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import shutil
import sqlite3
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlencode, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import arguments, daemon, machine, run_main  # noqa: E402

import psutil  # noqa: E402

from tests.dbs_support import mysql_available  # noqa: E402
from wmgr.dbs.ddl import parse_create_table, sqlite_statements  # noqa: E402

DB = f"bench_qserv_{os.getpid()}"
SCHEMA = ("CREATE TABLE Object (objectId BIGINT NOT NULL, ra DOUBLE, decl DOUBLE, name VARCHAR(32), "
          "flags INT, chunkId INT NOT NULL, subChunkId INT NOT NULL, PRIMARY KEY (objectId)) ENGINE=MyISAM")
COLUMNS = 7
BOUNDARY = "part-X-of-the-multipart-request"
TARGET = 0.5


def make_table_file(path: Path, megabytes: float) -> int:
    """A tab-separated file of about this size (with \\N NULLs, as Qserv's partitioner writes)."""
    rows, size = 0, 0
    with open(path, "wb") as f:
        while size < megabytes * 2 ** 20:
            block = b"".join(b"%d\t%.9f\t%.9f\tobject-%d\t%s\t%d\t%d\n" % (
                i, (i * 0.37) % 360, (i * 0.11) % 180 - 90, i, b"\\N" if i % 7 == 0 else b"%d" % (i % 1000),
                i % 5000, i % 100) for i in range(rows, rows + 10000))
            f.write(block)
            rows, size = rows + 10000, size + len(block)
    return rows


class Connection:
    """A blocking HTTPS connection to the daemon with its CA and token (timed work only)."""

    def __init__(self, data_dir: Path, url: str) -> None:
        parts = urlsplit(url)
        context = ssl.create_default_context(cafile=str(data_dir / "ca.pem"))
        self.token = (data_dir / "client.token").read_text().strip()
        self.conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=context, timeout=3600)

    def send(self, method: str, path: str, body: Any = None, content_type: Optional[str] = None,
             length: Optional[int] = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        if content_type:
            headers["Content-Type"] = content_type
        if length is not None:
            headers["Content-Length"] = str(length)
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def form(self, method: str, path: str, fields: dict) -> Any:
        status, answer = self.send(method, path, urlencode(fields).encode(), "application/x-www-form-urlencoded")
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {answer}")
        return answer


def multipart_file(table_file: Path, out: Path) -> int:
    """The upload body, as WmgrClient.loadData sends it, written to disk (sent from there)."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"table-data\"; filename=\"{table_file.name}\""
            "\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    with open(out, "wb") as f, open(table_file, "rb") as data:
        f.write(head)
        shutil.copyfileobj(data, f, 1 << 20)
        f.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return out.stat().st_size


def load_through_wmgr(d: Any, body_path: Path, table: str) -> dict:
    main, side = Connection(d.data_dir, d.url), Connection(d.data_dir, d.url)
    process = psutil.Process(d.process.pid)
    before = process.memory_info().rss
    peak, latencies, done = [before], [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            started = time.perf_counter()
            status, _ = side.send("GET", f"/dbs/{DB}/tables")
            latencies.append(time.perf_counter() - started)
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    with open(body_path, "rb") as body:
        status, answer = main.send("POST", f"/dbs/{DB}/tables/{table}/data", body,
                                   f"multipart/form-data; boundary={BOUNDARY}", body_path.stat().st_size)
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    if status != 200:
        raise RuntimeError(f"upload: {status} {answer}")
    return {"rows": answer["result"]["count"], "seconds": seconds, "rss_growth_mb": (peak[0] - before) / 2 ** 20,
            "latencies": latencies}


def sqlite_baseline(table_file: Path, directory: Path) -> float:
    path = directory / f"baseline-{time.monotonic_ns()}.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in sqlite_statements(parse_create_table(SCHEMA)):
        conn.execute(statement)
    insert = f"INSERT INTO Object VALUES ({', '.join('?' * COLUMNS)})"
    opener = gzip.open if table_file.suffix == ".gz" else open
    started = time.perf_counter()
    conn.execute("BEGIN")
    with opener(table_file, "rt", encoding="utf-8", newline="\n") as f:
        while True:
            lines = f.readlines(1 << 20)
            if not lines:
                break
            conn.executemany(insert, [[None if v == "\\N" else v for v in line[:-1].split("\t")] for line in lines])
    conn.execute("COMMIT")
    seconds = time.perf_counter() - started
    conn.close()
    path.unlink()
    return seconds


def mysql_baseline(table_file: Path) -> float:
    table = f"baseline_{time.monotonic_ns()}"
    run = ["mariadb", "--local-infile=1", "-h127.0.0.1", "-P3306", "-uroot", DB]
    subprocess.run(run + ["-e", SCHEMA.replace("TABLE Object", f"TABLE {table}")], check=True)
    source = "/dev/stdin" if table_file.suffix == ".gz" else str(table_file)
    load = f"LOAD DATA LOCAL INFILE '{source}' INTO TABLE {table} CHARACTER SET utf8mb4"
    started = time.perf_counter()
    if table_file.suffix == ".gz":
        zcat = subprocess.Popen(["zcat", str(table_file)], stdout=subprocess.PIPE)
        subprocess.run(run + ["-e", load], stdin=zcat.stdout, check=True)
        zcat.wait()
    else:
        subprocess.run(run + ["-e", load], check=True)
    seconds = time.perf_counter() - started
    subprocess.run(run + ["-e", f"DROP TABLE {table}"], check=True)
    return seconds


def config_for(kind: str) -> str:
    if kind == "mysql":
        return f"[dbs]\nbackend = mysql\nurl = mysql://root@127.0.0.1:3306\nxrootd_db = {DB}_qservw\n"
    return "[dbs]\nbackend = sqlite\n"


async def bench_backend(reactor: Any, kind: str, files: dict[str, Path], rows: int, work: Path, opts: Any) -> bool:
    ok = True
    async with daemon(reactor, config_for(kind), opts.keep_log) as d:
        admin = Connection(d.data_dir, d.url)
        admin.form("POST", "/dbs", {"db": DB})
        try:
            for fmt, path in files.items():
                table = f"Object_{fmt}"
                admin.form("POST", f"/dbs/{DB}/tables", {"table": table, "schema": SCHEMA.replace(
                    "TABLE Object", f"TABLE {table}")})
                body = work / f"body-{fmt}"
                size = multipart_file(path, body)
                result = load_through_wmgr(d, body, table)
                body.unlink()
                baseline = sqlite_baseline(path, work) if kind == "sqlite" else mysql_baseline(path)
                assert result["rows"] == rows, (result["rows"], rows)
                mine, theirs = rows / result["seconds"], rows / baseline
                lat = sorted(result["latencies"]) or [float("nan")]
                ratio = mine / theirs
                ok = ok and ratio >= TARGET
                print(f"{kind:6} {fmt:5} file {path.stat().st_size / 2 ** 20:6.1f} MB (upload {size / 2 ** 20:.1f} MB), "
                      f"{rows:,} rows: wmgr {mine:,.0f} rows/s ({result['seconds']:.2f} s), "
                      f"baseline {theirs:,.0f} rows/s ({baseline:.2f} s): ratio {ratio:.0%} "
                      f"(target >= {TARGET:.0%}); daemon RSS +{result['rss_growth_mb']:.1f} MB; "
                      f"{len(lat)} GETs during the load: median {statistics.median(lat) * 1000:.1f} ms, "
                      f"max {lat[-1] * 1000:.1f} ms")
        finally:
            admin.send("DELETE", f"/dbs/{DB}")
            if kind == "mysql":
                subprocess.run(["mariadb", "-h127.0.0.1", "-uroot", "-e",
                                f"DROP DATABASE IF EXISTS {DB}; DROP DATABASE IF EXISTS {DB}_qservw"], check=False)
    return ok


async def main(reactor: Any, opts: Any) -> int:
    print(f"machine: {machine()} (shared with other work: figures are indicative)")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"wmgr-bench-qserv-{os.getpid()}"
    work.mkdir()
    try:
        plain = work / "Object.txt"
        rows = make_table_file(plain, 2 if opts.smoke else 100)
        packed = work / "Object.txt.gz"
        with open(plain, "rb") as src, gzip.open(packed, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        files = {"plain": plain, "gzip": packed}
        ok = await bench_backend(reactor, "sqlite", files, rows, work, opts)
        if mysql_available():
            ok = await bench_backend(reactor, "mysql", files, rows, work, opts) and ok
        else:
            print("mysql: skipped (MariaDB is not reachable at 127.0.0.1:3306)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok or opts.smoke else 1


if __name__ == "__main__":
    options = arguments(__doc__.splitlines()[0])
    run_main(lambda reactor: main(reactor, options))
