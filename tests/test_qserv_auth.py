"""Access to the Qserv routes (wmgr.api.qserv_auth): the token, Basic, Digest without replays,
behind the real Root, under StubTreq with a Clock for the digest nonces' age."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Optional

import pytest
import pytest_twisted
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.task import Clock

from wmgr.api.qserv import install_qserv_error_handlers, results
from wmgr.api.qserv_auth import QservAuth, read_secret
from wmgr.api.root import Root, RootApp, Surface
from wmgr.errors import InvalidRequest

TOKEN = "qserv-Test_token"
BASE = "http://wmgr.test"
USER, PASSWORD = b"qsmaster", b"pa:ss:word"


class Probe:
    app = Klein()
    install_qserv_error_handlers(app)

    @app.route("/services", methods=["GET", "PUT"])
    def services(self, request: Any) -> bytes:
        return results(request, [request.method.decode()])


class Other:
    app = Klein()

    @app.route("/rest/v1/info/", methods=["GET"])
    def info(self, request: Any) -> bytes:
        return b"{}"


def make_client(schemes: list[str], clock: Optional[Clock] = None, secret: Any = (USER, PASSWORD)) -> StubTreq:
    auth = QservAuth(schemes, secret, clock or Clock())
    surfaces = [Surface(("services",), auth.protect(Probe().app.resource()), own_auth=True),
                Surface(("rest",), Other().app.resource())]
    return StubTreq(Root(TOKEN, surfaces, RootApp({}).app.resource()))


async def get(client: StubTreq, path: str = "/services", method: str = "GET", **headers: str) -> Any:
    response = await client.request(method, BASE + path, headers=headers)
    response.body = await response.content()
    return response


def challenge(response: Any, scheme: str = "Digest") -> dict[str, str]:
    [header] = [h for h in response.headers.getRawHeaders("www-authenticate") if h.startswith(scheme)]
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def digest_header(params: dict[str, str], method: str = "GET", uri: str = "/services", nc: int = 1,
                  user: bytes = USER, password: bytes = PASSWORD, qop: bool = True) -> str:
    md5 = lambda text: hashlib.md5(text.encode()).hexdigest()  # noqa: E731
    ha1 = md5(f"{user.decode()}:{params['realm']}:{password.decode()}")
    ha2 = md5(f"{method}:{uri}")
    fields = {"username": user.decode(), "realm": params["realm"], "nonce": params["nonce"], "uri": uri,
              "opaque": params["opaque"], "algorithm": "MD5"}
    if qop:
        count, cnonce = f"{nc:08x}", "0a4f113b"
        fields.update(qop="auth", nc=count, cnonce=cnonce,
                      response=md5(f"{ha1}:{params['nonce']}:{count}:{cnonce}:auth:{ha2}"))
    else:
        fields["response"] = md5(f"{ha1}:{params['nonce']}:{ha2}")
    return "Digest " + ", ".join(f'{k}={v}' if k in ("nc", "qop") else f'{k}="{v}"' for k, v in fields.items())


def basic(user: bytes = USER, password: bytes = PASSWORD) -> str:
    return "Basic " + base64.b64encode(user + b":" + password).decode()


# -- the token and the challenge ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_token_goes_through():
    response = await get(make_client(["digest"]), Authorization=f"Bearer {TOKEN}")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_without_credentials_a_401_with_the_challenge_in_the_qserv_envelope():
    response = await get(make_client(["digest"]))
    assert response.code == 401
    assert json.loads(response.body)["exception"] == "Unauthorized"
    params = challenge(response)
    assert params["realm"] == "wmgr" and params["qop"] == "auth" and params["nonce"] and params["opaque"]
    assert response.headers.getRawHeaders("www-authenticate")[0].startswith("Digest ")


@pytest_twisted.ensureDeferred
async def test_both_schemes_offer_both_challenges():
    response = await get(make_client(["basic", "digest"]))
    assert [h.split()[0] for h in response.headers.getRawHeaders("www-authenticate")] == ["Basic", "Digest"]


@pytest_twisted.ensureDeferred
async def test_without_a_secret_only_the_token():
    client = make_client(["digest", "basic"], secret=None)
    response = await get(client, Authorization=basic())
    assert response.code == 401 and not response.headers.getRawHeaders("www-authenticate")
    assert (await get(client, Authorization=f"Bearer {TOKEN}")).code == 200


@pytest_twisted.ensureDeferred
async def test_none_is_open():
    assert (await get(make_client(["none"]))).code == 200


# -- Basic ----------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_basic():
    client = make_client(["basic"])
    assert (await get(client, Authorization=basic())).code == 200
    for header in (basic(password=b"wrong"), basic(user=b"other"), "Basic !!!notbase64", "Basic",
                   f"Bearer {TOKEN}x"):
        response = await get(client, Authorization=header)
        assert response.code == 401, header
        assert challenge(response, "Basic")["realm"] == "wmgr"


@pytest_twisted.ensureDeferred
async def test_basic_is_refused_when_only_digest_is_configured():
    assert (await get(make_client(["digest"]), Authorization=basic())).code == 401


@pytest_twisted.ensureDeferred
async def test_a_basic_user_reaches_only_the_qserv_routes():
    client = make_client(["basic"])
    assert (await get(client, "/rest/v1/info/", Authorization=basic())).code == 401
    assert (await get(client, "/rest/v1/info/", Authorization=f"Bearer {TOKEN}")).code == 200


# -- Digest ---------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_digest_and_its_nonce_counts():
    client = make_client(["digest"])
    params = challenge(await get(client))
    first = digest_header(params, nc=1)
    assert (await get(client, Authorization=first)).code == 200
    # the same header again: a replay
    replayed = await get(client, Authorization=first)
    assert replayed.code == 401 and challenge(replayed)["nonce"] != params["nonce"]
    # the client's next request with the same nonce counts up, as python-requests does
    assert (await get(client, Authorization=digest_header(params, nc=2))).code == 200
    assert (await get(client, Authorization=digest_header(params, nc=2))).code == 401
    assert (await get(client, Authorization=digest_header(params, nc=1))).code == 401
    assert (await get(client, Authorization=digest_header(params, nc=7))).code == 200


@pytest_twisted.ensureDeferred
async def test_a_failed_digest_does_not_spend_the_nonce():
    client = make_client(["digest"])
    params = challenge(await get(client))
    assert (await get(client, Authorization=digest_header(params, password=b"wrong"))).code == 401
    assert (await get(client, Authorization=digest_header(params))).code == 200


@pytest_twisted.ensureDeferred
async def test_a_digest_without_qop_serves_once():
    client = make_client(["digest"])
    params = challenge(await get(client))
    header = digest_header(params, qop=False)
    assert (await get(client, Authorization=header)).code == 200
    assert (await get(client, Authorization=header)).code == 401


@pytest_twisted.ensureDeferred
async def test_a_digest_is_good_for_its_own_uri_and_method_only():
    client = make_client(["digest"])
    params = challenge(await get(client))
    assert (await get(client, "/services?x=1", Authorization=digest_header(params, nc=1))).code == 401
    assert (await get(client, method="PUT", Authorization=digest_header(params, nc=2))).code == 401
    assert (await get(client, method="PUT", Authorization=digest_header(params, method="PUT", nc=3))).code == 200


@pytest_twisted.ensureDeferred
async def test_digest_refusals():
    client = make_client(["digest"])
    params = challenge(await get(client))
    forged = dict(params, nonce="0" * 24)
    tampered = dict(params, opaque=params["opaque"][:-4] + "AAAA")
    for header in (digest_header(params, password=b"wrong"), digest_header(params, user=b"other"),
                   digest_header(forged), digest_header(tampered), "Digest garbage", "Digest"):
        assert (await get(client, Authorization=header)).code == 401, header


@pytest_twisted.ensureDeferred
async def test_a_nonce_older_than_15_minutes_is_refused():
    clock = Clock()
    client = make_client(["digest"], clock)
    params = challenge(await get(client))
    clock.advance(14 * 60)
    assert (await get(client, Authorization=digest_header(params, nc=1))).code == 200
    clock.advance(2 * 60)
    assert (await get(client, Authorization=digest_header(params, nc=2))).code == 401


# -- the secret file ------------------------------------------------------------------------------------


def test_read_secret(tmp_path: Path):
    path = tmp_path / "wmgr.secret"
    path.write_bytes(b"qsmaster:pa:ss:word\n")
    assert read_secret(path) == (b"qsmaster", b"pa:ss:word")
    for text in (b"", b"nocolon\n", b":password\n", b"user:\n", b"a:b\nc:d\n"):
        path.write_bytes(text)
        with pytest.raises(InvalidRequest, match="one line, user:password"):
            read_secret(path)
    with pytest.raises(InvalidRequest, match="cannot read"):
        read_secret(tmp_path / "absent")


def test_from_config(tmp_path: Path):
    from wmgr.config import Config

    secret = tmp_path / "wmgr.secret"
    secret.write_bytes(b"qsmaster:pw\n")
    secret.chmod(0o600)
    config = Config(data_dir=tmp_path)
    assert QservAuth.from_config(config, Clock()).factories == []  # no secret: the token only
    config.qserv_secret_file = secret
    auth = QservAuth.from_config(config, Clock())
    assert [f.scheme for f in auth.factories] == [b"digest"] and not auth.open  # the original's default
    config.qserv_auth = ["basic", "digest"]
    assert [f.scheme for f in QservAuth.from_config(config, Clock()).factories] == [b"basic", b"digest"]
    config.qserv_auth = ["none"]
    assert QservAuth.from_config(config, Clock()).open
    config.qserv_auth = ["digest"]
    secret.write_bytes(b"no colon\n")
    with pytest.raises(InvalidRequest):
        QservAuth.from_config(config, Clock())
