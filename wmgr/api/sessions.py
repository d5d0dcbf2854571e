"""Browser sessions for the dashboard: a cookie that stands for the token, and the CSRF check that
goes with it.

The page logs in once with the token (POST /ui/login); the daemon answers with a cookie holding a
random session id, mapped here to an expiry time. The token itself never sits in a cookie or a
URL. The cookie is HttpOnly (no script reads it), Secure and SameSite=Strict (a page of another
site cannot make the browser send it). As a second line, every state-changing request (anything
but GET and HEAD) authorised by the cookie must carry an Origin header (or, absent that, a
Referer) of the daemon's own origin: the scheme it was reached by and the Host the browser
named. A request with the bearer token is not a browser's ambient credential and is not checked.
"""

from __future__ import annotations

import secrets
from typing import Any, Optional
from urllib.parse import urlsplit

COOKIE = b"wmgr_session"
LIFETIME = 12 * 3600.0  # seconds a login lasts
MAX_SESSIONS = 1000  # logins kept at once; the oldest goes first
SAFE_METHODS = frozenset({b"GET", b"HEAD"})

# What Sessions.authorise says about a request.
NO_SESSION = "none"
SESSION_OK = "ok"
CROSS_ORIGIN = "cross-origin"


class Sessions:
    """Session ids and their expiry times, in memory: a restart of the daemon logs everyone out,
    which is the safe way round."""

    def __init__(self, clock: Any, lifetime: float = LIFETIME, max_sessions: int = MAX_SESSIONS) -> None:
        self._clock = clock
        self.lifetime = lifetime
        self._max = max_sessions
        self._expiry: dict[str, float] = {}  # insertion order is creation order

    def __len__(self) -> int:
        return len(self._expiry)

    def create(self) -> str:
        now = self._clock.seconds()
        for sid in [sid for sid, expiry in self._expiry.items() if expiry <= now]:
            del self._expiry[sid]
        while len(self._expiry) >= self._max:
            del self._expiry[next(iter(self._expiry))]
        sid = secrets.token_urlsafe(32)
        self._expiry[sid] = now + self.lifetime
        return sid

    def valid(self, sid: Optional[str]) -> bool:
        if not sid:
            return False
        expiry = self._expiry.get(sid)
        if expiry is None:
            return False
        if expiry <= self._clock.seconds():
            del self._expiry[sid]
            return False
        return True

    def end(self, sid: Optional[str]) -> None:
        if sid:
            self._expiry.pop(sid, None)

    # -- HTTP ------------------------------------------------------------------------------------

    def session_of(self, request: Any) -> Optional[str]:
        raw = request.getCookie(COOKIE)
        if not raw:
            return None
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return None

    def authorise(self, request: Any) -> str:
        """NO_SESSION (no valid cookie), SESSION_OK, or CROSS_ORIGIN: a valid cookie on a
        state-changing request that did not come from the daemon's own pages."""
        if not self.valid(self.session_of(request)):
            return NO_SESSION
        if request.method in SAFE_METHODS or same_origin(request):
            return SESSION_OK
        return CROSS_ORIGIN

    def set_cookie(self, request: Any, sid: str) -> None:
        request.addCookie(COOKIE, sid.encode("ascii"), path=b"/", max_age=str(int(self.lifetime)).encode(),
                          secure=True, httpOnly=True, sameSite="strict")

    @staticmethod
    def clear_cookie(request: Any) -> None:
        request.addCookie(COOKIE, b"", path=b"/", max_age=b"0", secure=True, httpOnly=True, sameSite="strict")


def own_origin(request: Any) -> Optional[str]:
    """The origin the browser reached the daemon by: its scheme and the Host it named."""
    host = request.getHeader(b"host")
    if not host:
        return None
    scheme = "https" if request.isSecure() else "http"
    return f"{scheme}://{host.decode('ascii', 'replace').lower()}"


def same_origin(request: Any) -> bool:
    """The request's Origin (or, without one, its Referer's origin) is the daemon's own. A request
    with neither is refused: every browser sends Origin on a state-changing fetch."""
    mine = own_origin(request)
    if mine is None:
        return False
    origin = request.getHeader(b"origin")
    if origin is not None:
        return origin.decode("ascii", "replace").lower() == mine
    referer = request.getHeader(b"referer")
    if referer is None:
        return False
    parts = urlsplit(referer.decode("ascii", "replace"))
    return f"{parts.scheme}://{parts.netloc}".lower() == mine
