"""wmgr.tls: the daemon's own CA, the server certificate, its names and its renewal."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from wmgr import tls
from wmgr.tls import ServerTLS, ensure_ca, issue_server_cert, needs_renewal, server_names


def sans(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def dns_names(cert: x509.Certificate) -> set[str]:
    return set(sans(cert).get_values_for_type(x509.DNSName))


def ip_names(cert: x509.Certificate) -> set[str]:
    return {str(a) for a in sans(cert).get_values_for_type(x509.IPAddress)}


def verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """Raises unless `cert` is issued by `ca` and carries its signature."""
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def server(tmp_path: Path) -> ServerTLS:
    return ServerTLS(tmp_path)


def test_files_and_modes(server: ServerTLS, tmp_path: Path) -> None:
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        assert (tmp_path / name).is_file(), name
    assert mode(tmp_path / "ca.key") == 0o600
    assert mode(tmp_path / "server.key") == 0o600
    assert server.ca_path == tmp_path / "ca.pem"
    assert not list(tmp_path.glob("*.tmp"))


def test_the_ca(server: ServerTLS, tmp_path: Path) -> None:
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    verify_signed_by(ca, ca)  # self-signed
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > datetime.timedelta(days=3000)


def test_the_ca_is_made_once_and_reused(tmp_path: Path) -> None:
    first = ServerTLS(tmp_path)
    ca_pem, ca_key = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "ca.key").read_bytes()
    server_pem = (tmp_path / "server.pem").read_bytes()
    second = ServerTLS(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == ca_pem
    assert (tmp_path / "ca.key").read_bytes() == ca_key
    assert second.ca.cert == first.ca.cert
    # a valid server certificate with the same names is reused too
    assert (tmp_path / "server.pem").read_bytes() == server_pem
    assert second.renew() is False


def test_server_certificate(server: ServerTLS, tmp_path: Path) -> None:
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    assert cert == server.cert
    verify_signed_by(cert, server.ca.cert)
    assert dns_names(cert) == {"localhost", socket.gethostname()}
    assert ip_names(cert) == {"127.0.0.1", "::1"}
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= datetime.timedelta(days=398)


def test_extra_names_go_into_the_right_kind_of_san(tmp_path: Path) -> None:
    server = ServerTLS(tmp_path, ["10.20.30.40", "farm.example.org", " ", "fe80::1", "localhost", "127.0.0.1"])
    cert = server.cert
    assert dns_names(cert) == {"localhost", socket.gethostname(), "farm.example.org"}
    assert ip_names(cert) == {"127.0.0.1", "::1", "10.20.30.40", "fe80::1"}
    # no address hides in a DNS SAN (a verifier may fail open on one)
    for name in dns_names(cert):
        with pytest.raises(ValueError):
            ipaddress.ip_address(name)
    # and no duplicates
    assert len(sans(cert)) == len(set(sans(cert)))


def test_server_names() -> None:
    names = server_names(["192.168.0.1", "a.example"])
    assert x509.IPAddress(ipaddress.ip_address("192.168.0.1")) in names
    assert x509.DNSName("a.example") in names
    assert x509.DNSName("192.168.0.1") not in names


def test_renew_after_340_days_issues_a_new_cert_from_the_same_ca(server: ServerTLS, tmp_path: Path) -> None:
    old = server.cert
    ca_pem = (tmp_path / "ca.pem").read_bytes()
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=340)
    assert server.renew(later) is False, "57 days left: not due yet"
    much_later = later + datetime.timedelta(days=30)  # 27 days left
    assert server.renew(much_later) is True
    new = server.cert
    assert new != old and new.serial_number != old.serial_number
    verify_signed_by(new, server.ca.cert)
    assert (tmp_path / "ca.pem").read_bytes() == ca_pem
    assert new.not_valid_after_utc > much_later + datetime.timedelta(days=300)
    assert x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes()) == new
    assert mode(tmp_path / "server.key") == 0o600
    assert dns_names(new) == dns_names(old) and ip_names(new) == ip_names(old)
    # served from the next connection on
    assert server._options is not None


def test_renew_is_due_at_fewer_than_30_days(server: ServerTLS) -> None:
    expiry = server.cert.not_valid_after_utc
    assert not needs_renewal(server.cert, server.names, expiry - datetime.timedelta(days=30, seconds=1))
    assert needs_renewal(server.cert, server.names, expiry - datetime.timedelta(days=29, hours=23))
    assert needs_renewal(server.cert, server.names, expiry + datetime.timedelta(days=1))


def test_needs_renewal_on_changed_names(server: ServerTLS) -> None:
    assert not needs_renewal(server.cert, server.names)
    assert not needs_renewal(server.cert, list(reversed(server.names)))
    assert needs_renewal(server.cert, server_names(["new.example"]))
    assert needs_renewal(server.cert, server.names[:-1])


def test_changed_names_give_a_new_cert_at_start(tmp_path: Path) -> None:
    first = ServerTLS(tmp_path).cert
    second = ServerTLS(tmp_path, ["new.example"]).cert
    assert second != first
    assert "new.example" in dns_names(second)


def test_a_cert_from_a_previous_ca_is_replaced(tmp_path: Path) -> None:
    old = ServerTLS(tmp_path).cert
    (tmp_path / "ca.pem").unlink()
    (tmp_path / "ca.key").unlink()
    server = ServerTLS(tmp_path)  # a new CA
    assert server.cert != old
    verify_signed_by(server.cert, server.ca.cert)


def test_a_cert_from_a_differently_named_ca_is_replaced(tmp_path: Path) -> None:
    ServerTLS(tmp_path)
    (tmp_path / "other").mkdir()
    other = ensure_ca(tmp_path / "other")
    foreign, key = issue_server_cert(tls.Authority(_renamed(other.cert, other.key), other.key), server_names())
    (tmp_path / "server.pem").write_bytes(foreign.public_bytes(tls.serialization.Encoding.PEM))
    server = ServerTLS(tmp_path)
    assert server.cert != foreign
    verify_signed_by(server.cert, server.ca.cert)


def _renamed(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """A copy of a CA certificate with another subject."""
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "some other CA")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True))
    return builder.sign(key, tls.hashes.SHA256())


def test_renew_if_due_renews_and_never_raises(server: ServerTLS, monkeypatch: pytest.MonkeyPatch) -> None:
    old = server.cert
    monkeypatch.setattr(tls, "_now", lambda: datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=380))
    server.renew_if_due()
    assert server.cert != old

    def broken(*args: object, **kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(server, "renew", broken)
    monkeypatch.setattr(tls, "_now", lambda: datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=800))
    server.renew_if_due()  # logged, not raised


def test_issue_uses_the_given_now(server: ServerTLS) -> None:
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    cert, key = issue_server_cert(server.ca, server.names, now)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc == now + datetime.timedelta(days=tls.SERVER_DAYS)


def test_server_connection_for_tls(server: ServerTLS) -> None:
    connection = server.serverConnectionForTLS(None)
    from OpenSSL import SSL

    assert isinstance(connection, SSL.Connection)
