"""The client token: 32 random bytes, URL-safe base64, made once and kept in the data directory."""

from __future__ import annotations

import base64
import hmac
import secrets
from pathlib import Path
from typing import Optional

from wmgr.files import write_private

TOKEN_FILE = "client.token"
# A token that grants the worker routes (/worker/...) only: given to worker daemons and runners.
WORKER_TOKEN_FILE = "worker.token"


def ensure_token(directory: Path, name: str = TOKEN_FILE) -> str:
    path = Path(directory) / name
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    write_private(path, token.encode("ascii") + b"\n")
    return token


def presented_token(authorization: Optional[bytes], query_token: Optional[bytes]) -> Optional[bytes]:
    """The token a request carries: `Authorization: Bearer` (the scheme word in any case, as pfurl
    sends `bearer`), else the `token` query parameter."""
    if authorization:
        scheme, _, value = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer" and value.strip():
            return value.strip()
    return query_token or None


def token_matches(expected: str, presented: Optional[bytes]) -> bool:
    return presented is not None and hmac.compare_digest(expected.encode("ascii"), presented)
