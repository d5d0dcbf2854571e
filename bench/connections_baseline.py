"""The baseline of bench/connections.py: a minimal Flask connectivity server of our own that does
the original's work the original's way (one dict of partitions, one global lock, a regex compiled
and matched per entry, the reply built with an f-string), so that the benchmark compares wmgr
with that design under the original's documented gunicorn command. Only the routes the benchmark
uses. Not part of wmgr; run by bench/connections.py:

    ENTRY_TTL=3600 gunicorn -b 127.0.0.1:PORT --workers=1 --worker-class=gthread --threads=2 \
        --timeout 5000000000 connections_baseline:app
"""

import json
import os
import re
import threading
import time
from collections import namedtuple

from flask import Flask, abort, request

app = Flask(__name__)

ENTRY_TTL = int(os.environ.get("ENTRY_TTL", "10"))
Entry = namedtuple("Entry", "uri data_type connection_type time")
partitions = {}
lock = threading.Lock()


@app.route("/publish", methods=["POST"])
def publish():
    now = time.time()
    body = json.loads(request.data)
    with lock:
        partition = partitions.setdefault(body["partition"], {})
        for connection in body["connections"]:
            partition[connection["uid"]] = Entry(connection["uri"], connection["data_type"],
                                                 connection["connection_type"], now)
    return "OK"


@app.route("/getconnection/<partition>", methods=["GET", "POST"])
def getconnection(partition):
    now = time.time()
    body = json.loads(request.data)
    with lock:
        if partition not in partitions:
            abort(404)
        pattern = re.compile(body["uid_regex"])
        found = []
        for uid, entry in partitions[partition].items():
            if now - entry.time < ENTRY_TTL and entry.data_type == body["data_type"] and pattern.fullmatch(uid):
                found.append(f'{{"uid":"{uid}","uri":"{entry.uri}","connection_type":{entry.connection_type},'
                             f'"data_type":"{entry.data_type}"}}')
    return "[" + ",".join(found) + "]"
