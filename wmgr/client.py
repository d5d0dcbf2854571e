"""The wmgr client: treq over HTTPS that trusts the daemon's own CA and sends its token.

Used by the tests, the `wmgr` command and the worker role. It owns its connection pool and closes
it in `close()` (or at the end of `async with`), so nothing is left behind in the reactor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool


class Reply:
    """A finished response: its status code, headers and body."""

    def __init__(self, code: int, headers: Any, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Reply {self.code} {self.body[:200]!r}>"


class _EventReader(Protocol):
    """Splits an event stream into events and hands each one's JSON data on; once told to stop
    (or on a failure), it drops the connection, which is how a client leaves an event stream."""

    def __init__(self, on_data: Callable[[Any], bool], finished: Deferred[None]) -> None:
        self._on_data = on_data
        self._finished = finished
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._buffer += data.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer and not self._finished.called:
            event, _, self._buffer = self._buffer.partition(b"\n\n")
            lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
            if not lines:
                continue  # a comment (keep-alive) or a retry: line
            try:
                done = self._on_data(json.loads(b"\n".join(lines)))
            except BaseException as e:
                self._finished.errback(e)
                done = True
            else:
                if done:
                    self._finished.callback(None)
            if done:
                self.transport.stopProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if not self._finished.called:
            self._finished.errback(ConnectionError("the daemon closed the event stream"))


class EventStreamRefused(Exception):
    """The daemon answered an event-stream request with an error status."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"event stream refused: {reply}")
        self.reply = reply


class Client:
    def __init__(self, reactor: Any, base_url: str, ca_pem: Optional[bytes], token: Optional[str],
                 http: Optional[Any] = None, persistent: bool = True, idle_timeout: Optional[float] = None) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.token = token
        self._pool: Optional[HTTPConnectionPool] = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=persistent)
            if idle_timeout is not None:
                # Close kept-alive connections before the server does ([http] header_timeout): a
                # POST on a connection the server has just closed fails and is not retried.
                self._pool.cachedConnectionTimeout = idle_timeout
            self._pool.maxPersistentPerHost = 8
            policy = None
            if ca_pem is not None:
                policy = BrowserLikePolicyForHTTPS(trustRootFromCertificates([Certificate.loadPEM(ca_pem)]))
            agent = Agent(reactor, contextFactory=policy, pool=self._pool) if policy else Agent(reactor, pool=self._pool)
            http = HTTPClient(agent)
        self._http = http

    @classmethod
    def from_data_dir(cls, reactor: Any, data_dir: Path | str, base_url: Optional[str] = None, **kw: Any) -> "Client":
        """A client for the daemon whose data directory this is: its URL, CA and token."""
        data_dir = Path(data_dir)
        url = base_url or (data_dir / "wmgr.url").read_text().strip()
        token = (data_dir / "client.token").read_text().strip()
        return cls(reactor, url, (data_dir / "ca.pem").read_bytes(), token, **kw)

    async def request(self, method: str, path: str, body: Any = None, params: Optional[Mapping[str, Any]] = None,
                      data: Optional[bytes] = None, headers: Optional[Mapping[str, str]] = None,
                      token: Any = True, timeout: Optional[float] = 60) -> Reply:
        """Send a request; `body` is sent as JSON, `data` as it is; `token=False` sends none."""
        all_headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        if token is True and self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        elif isinstance(token, str):
            all_headers["Authorization"] = f"Bearer {token}"
        all_headers.update(headers or {})
        response = await self._http.request(
            method, self.base_url + path.lstrip("/"), data=data, params=dict(params or {}),
            headers={k: [v] for k, v in all_headers.items()}, timeout=timeout,
        )
        content = await treq.content(response)
        return Reply(response.code, response.headers, content)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("POST", path, body=body, **kw)

    async def put(self, path: str, **kw: Any) -> Reply:
        return await self.request("PUT", path, **kw)

    async def patch(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("PATCH", path, body=body, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.request("DELETE", path, **kw)

    # -- the wr job API ------------------------------------------------------------------------

    async def add_jobs(self, jobs: list[dict[str, Any]], **defaults: Any) -> list[dict[str, Any]]:
        reply = await self.post("rest/v1/jobs/", jobs, params=defaults)
        if reply.code != 201:
            raise RuntimeError(f"adding jobs failed: {reply}")
        return reply.json()

    async def jobs(self, ids: str = "", **params: Any) -> list[dict[str, Any]]:
        reply = await self.get(f"rest/v1/jobs/{ids}", params=params)
        if reply.code != 200:
            raise RuntimeError(f"listing jobs failed: {reply}")
        return reply.json()

    async def follow_events(self, path: str, on_data: Callable[[Any], bool]) -> None:
        """Follow a Server-Sent Events stream (GET /ui/events): call on_data with each event's
        data, parsed as JSON, until it returns True; then drop the connection."""
        headers = {"Accept": ["text/event-stream"]}
        if self.token:
            headers["Authorization"] = [f"Bearer {self.token}"]
        response = await self._http.request("GET", self.base_url + path.lstrip("/"), headers=headers,
                                            unbuffered=True)
        if response.code != 200:
            body = await treq.content(response)
            raise EventStreamRefused(Reply(response.code, response.headers, body))
        finished: Deferred[None] = Deferred()
        response.deliverBody(_EventReader(on_data, finished))
        await finished

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
