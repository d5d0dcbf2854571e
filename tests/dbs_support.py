"""What the databases tests share: both backends, unique names per run, multipart bodies.

The MySQL/MariaDB backend's tests need a server at 127.0.0.1:3306 (root, no password; .ci/run
starts one); without it they are skipped, and the skip says why. Every database a test run makes
on that server starts with RUN_PREFIX (pid and a random part), and the run drops them all.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Optional

import pytest

MYSQL_URL = "mysql://root@127.0.0.1:3306"
RUN_PREFIX = f"wmgrt{os.getpid()}_{secrets.token_hex(3)}_"
BACKENDS = ["sqlite", "mysql"]
BOUNDARY = "part-X-of-the-multipart-request"  # WmgrClient's fixed boundary


def mysql_available(host: str = "127.0.0.1", port: int = 3306) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def skip_without_mysql(kind: str) -> None:
    if kind != "mysql":
        return
    if not mysql_available():
        pytest.skip("MariaDB is not reachable at 127.0.0.1:3306: the MySQL backend's tests need it "
                    "(start it: start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd)")
    import pymysql

    try:
        pymysql.connect(host="127.0.0.1", port=3306, user="root", connect_timeout=5).close()
    except pymysql.err.MySQLError as e:
        pytest.skip(f"MariaDB at 127.0.0.1:3306 does not let root in without a password ({e}): "
                    "the MySQL backend's tests need that (.ci/run sets it up)")


def drop_run_databases(prefix: str = RUN_PREFIX) -> None:
    """Drop every database of this run on the MariaDB server."""
    if not mysql_available():
        return
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    try:
        with conn.cursor() as cursor:
            cursor.execute("SHOW DATABASES")
            for (name,) in cursor.fetchall():
                if name.startswith(prefix):
                    cursor.execute(f"DROP DATABASE `{name}`")
    finally:
        conn.close()


def multipart(data: bytes, filename: Optional[str] = "table.data", options: Optional[str] = None,
              options_first: bool = True, field_name: str = "table-data") -> tuple[bytes, str]:
    """A body as WmgrClient.loadData builds it (its boundary and part headers)."""
    parts = []
    if options is not None:
        parts.append(b'Content-Disposition: form-data; name="load-options"\r\n'
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Transfer-Encoding: binary\r\n\r\n" + options.encode())
    disposition = f'form-data; name="{field_name}"' + (f'; filename="{filename}"' if filename else "")
    data_part = (f"Content-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n"
                 "Content-Transfer-Encoding: binary\r\n\r\n").encode() + data
    parts.insert(len(parts) if options_first else 0, data_part)
    delimiter = f"--{BOUNDARY}".encode()
    body = b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in parts) + delimiter + b"--\r\n"
    return body, f"multipart/form-data; boundary={BOUNDARY}"
