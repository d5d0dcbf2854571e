"""Access to the Qserv routes: the bearer token, or HTTP Basic/Digest from a secret file.

Qserv's tools (`WmgrClient`, the data loader, the watcher) authenticate with a `user:password`
secret file over Basic or Digest (digest by default), as the original's did. Root hands the Qserv
surfaces every request (`Surface(own_auth=True)`) with `request.wmgr_token_ok`; `QservGuard`
lets a request with the token through, else checks its Basic/Digest credentials through a
`twisted.cred` portal (a checker made from the secret file, a realm whose avatar is the wrapped
surface) and answers a 401 with the challenges, in the Qserv envelope, when they fail.

Digest nonces cannot be replayed (the original accepted any nonce, any number of times): a nonce
must be one this daemon issued to this client address (Twisted's opaque check) within the last
15 minutes, each successful use must raise its nonce count (a nonce without `qop` serves once),
and the `uri` the client digested must be the request's own.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Iterable, Optional

from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import DigestedCredentials, IUsernameDigestHash, IUsernamePassword, UsernamePassword
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import fail, succeed
from twisted.logger import Logger
from twisted.web.guard import BasicCredentialFactory, DigestCredentialFactory
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from wmgr.api.qserv import answer, error_body
from wmgr.errors import InvalidRequest

log = Logger()

REALM = b"wmgr"
SCHEMES = ("basic", "digest")


def read_secret(path: Path) -> tuple[bytes, bytes]:
    """`user:password` from the secret file: one line, split at the first colon (the password may
    hold colons), both parts non-empty; anything else stops the daemon from starting."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise InvalidRequest(f"cannot read the Qserv secret file {path}: {e.strerror}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    user, colon, password = (lines[0] if len(lines) == 1 else b"").partition(b":")
    if not (colon and user and password):
        raise InvalidRequest(f"the Qserv secret file {path} must hold one line, user:password")
    return user, password


@implementer(ICredentialsChecker)
class SecretChecker:
    """The one user of the secret file, over Basic (a password) or Digest (a hash)."""

    credentialInterfaces = (IUsernamePassword, IUsernameDigestHash)

    def __init__(self, user: bytes, password: bytes) -> None:
        self._user = user
        self._password = password

    def requestAvatarId(self, credentials: Any) -> Any:
        if hmac.compare_digest(credentials.username, self._user):
            if isinstance(credentials, UsernamePassword):
                good = hmac.compare_digest(credentials.password, self._password)
            else:
                good = credentials.checkPassword(self._password)
            if good:
                return succeed(credentials.username)
        return fail(cred_error.UnauthorizedLogin())


@implementer(IRealm)
class SurfaceRealm:
    """Every authenticated user gets the one surface: Basic/Digest grants the Qserv routes only."""

    def __init__(self, resource: Any) -> None:
        self._resource = resource

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if IResource not in interfaces:
            raise NotImplementedError("only web resources are served")
        return IResource, self._resource, lambda: None


class _OneUseDigest(DigestedCredentials):
    """Digest credentials whose successful check spends their (nonce, count)."""

    def __init__(self, factory: "OneUseDigestFactory", nonce: bytes, count: int, base: DigestedCredentials) -> None:
        super().__init__(base.username, base.method, base.realm, base.fields)
        self._factory, self._nonce, self._count = factory, nonce, count

    def checkPassword(self, password: bytes) -> bool:
        return super().checkPassword(password) and self._factory.spend(self._nonce, self._count)

    def checkHash(self, digestHash: bytes) -> bool:
        return super().checkHash(digestHash) and self._factory.spend(self._nonce, self._count)


class OneUseDigestFactory(DigestCredentialFactory):
    """Twisted's Digest factory (MD5, qop=auth) with nonce counts enforced, on the reactor's clock."""

    def __init__(self, realm: bytes, clock: Any) -> None:
        super().__init__(b"md5", realm)
        self.digest._getTime = clock.seconds  # the documented seam for its timestamps
        self._clock = clock
        self._lifetime = self.digest.CHALLENGE_LIFETIME_SECS
        self._spent: dict[bytes, tuple[float, int]] = {}  # nonce -> (first use, highest count)
        self._next_prune = clock.seconds() + self._lifetime

    def decode(self, response: bytes, request: Any) -> Any:
        credentials = super().decode(response, request)  # our nonce, this client, not too old
        fields = credentials.fields
        if _bytes(fields.get("uri", b"")) != request.uri:
            raise cred_error.LoginFailed("the digest is for another URI")
        nonce = _bytes(fields["nonce"])
        count = 0
        if fields.get("qop"):
            try:
                count = int(fields.get("nc", ""), 16)
            except ValueError:
                raise cred_error.LoginFailed("bad nonce count") from None
        if count <= self._spent.get(nonce, (0.0, -1))[1]:
            raise cred_error.LoginFailed("replayed nonce")
        return _OneUseDigest(self, nonce, count, credentials)

    def spend(self, nonce: bytes, count: int) -> bool:
        """Record a successful use; False if that (nonce, count) was used meanwhile."""
        now = self._clock.seconds()
        if now >= self._next_prune:
            self._spent = {n: used for n, used in self._spent.items() if now - used[0] <= self._lifetime}
            self._next_prune = now + self._lifetime
        first, highest = self._spent.get(nonce, (now, -1))
        if count <= highest:
            return False
        self._spent[nonce] = (first, count)
        return True


def _bytes(value: Any) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


def _challenge_header(scheme: bytes, challenge: dict[str, Any]) -> bytes:
    params = []
    for key, value in challenge.items():
        value = value.encode("latin-1") if isinstance(value, str) else value
        params.append(key.encode("ascii") + b'="' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')
    return scheme.capitalize() + b" " + b", ".join(params)


class QservAuth:
    """The access rule of every Qserv surface (one instance for the daemon: the digest nonces it
    issued are good on every Qserv route)."""

    def __init__(self, schemes: Iterable[str], secret: Optional[tuple[bytes, bytes]], clock: Any) -> None:
        schemes = list(schemes)
        self.open = schemes == ["none"]
        self.checker = SecretChecker(*secret) if secret and not self.open else None
        self.factories: list[Any] = []
        if self.checker is not None:
            for scheme in schemes:
                if scheme == "basic":
                    self.factories.append(BasicCredentialFactory(REALM))
                elif scheme == "digest":
                    self.factories.append(OneUseDigestFactory(REALM, clock))

    @classmethod
    def from_config(cls, config: Any, clock: Any) -> "QservAuth":
        secret = read_secret(config.qserv_secret_file) if config.qserv_secret_file else None
        if secret and config.qserv_secret_file.stat().st_mode & 0o077:
            log.warn("the Qserv secret file {path} can be read by other users (chmod 600 it)",
                     path=str(config.qserv_secret_file))
        auth = cls(config.qserv_auth, secret, clock)
        if auth.open:
            log.warn("[qserv] auth = none: the Qserv routes (/dbs, /services, /xrootd) are open to anyone "
                     "who can reach the listeners")
        elif auth.checker is None:
            log.info("[qserv] secret_file is not set: the Qserv routes take the bearer token only")
        return auth

    def protect(self, resource: Any) -> "QservGuard":
        return QservGuard(self, resource)


class QservGuard(Resource):
    """A Qserv surface behind QservAuth: the token, or Basic/Digest through the portal."""

    isLeaf = True

    def __init__(self, auth: QservAuth, resource: Any) -> None:
        super().__init__()
        self._auth = auth
        self._resource = resource
        self._portal = Portal(SurfaceRealm(resource), [auth.checker] if auth.checker else [])

    def render(self, request: Any) -> Any:
        if self._auth.open or getattr(request, "wmgr_token_ok", False):
            return self._resource.render(request)
        credentials = self._credentials(request)
        if credentials is None:
            return self._unauthorized(request)
        d = self._portal.login(credentials, None, IResource)
        d.addCallbacks(lambda login: request.render(login[1]), lambda _: self._refuse(request))
        return NOT_DONE_YET

    def _credentials(self, request: Any) -> Any:
        scheme, _, response = (request.getHeader(b"authorization") or b"").partition(b" ")
        for factory in self._auth.factories:
            if factory.scheme == scheme.lower():
                try:
                    return factory.decode(response.strip(), request)
                except Exception:  # LoginFailed, or a garbled header the factory could not parse
                    return None
        return None

    def _refuse(self, request: Any) -> None:
        request.write(self._unauthorized(request))
        request.finish()

    def _unauthorized(self, request: Any) -> bytes:
        for factory in self._auth.factories:
            request.responseHeaders.addRawHeader(
                b"WWW-Authenticate", _challenge_header(factory.scheme, factory.getChallenge(request)))
        wanted = "the bearer token" + "".join(f" or {f.scheme.decode().capitalize()}" for f in self._auth.factories)
        return answer(request, error_body("Unauthorized", f"Unauthorized Access: {wanted} is required"), 401)
