"""The daemon's own certificate authority and its server certificate.

On first start a CA is made and kept (its key too, mode 0600), so that the server certificate can
be renewed without clients having to trust anything new. The server certificate names localhost,
this host and the loopback addresses, plus whatever the configuration adds; addresses only ever go
into IP-address SANs (an address in a DNS SAN makes some verifiers fail open).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from zope.interface import implementer

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger

from wmgr.files import write_private, write_public

log = Logger()

CA_DAYS = 3650
SERVER_DAYS = 397  # the longest validity browsers still accept for a leaf certificate
RENEW_BEFORE = datetime.timedelta(days=30)
# TLS 1.2 offers forward-secret AEAD suites only (no CBC, no SHA-1 MACs, no static RSA key
# exchange); TLS 1.3's suites are all of that kind and are left as OpenSSL has them.
TLS12_CIPHERS = ssl.AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:"
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-CHACHA20-POLY1305")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def server_names(extra: Iterable[str] = ()) -> list[x509.GeneralName]:
    """The SANs: DNS names as DNSName, addresses as IPAddress, without duplicates."""
    wanted = ["localhost", socket.gethostname(), "127.0.0.1", "::1", *extra]
    names: list[x509.GeneralName] = []
    for name in wanted:
        name = name.strip()
        if not name:
            continue
        try:
            general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            general = x509.DNSName(name)
        if general not in names:
            names.append(general)
    return names


@dataclass
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def ensure_ca(directory: Path) -> Authority:
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return Authority(cert, key)  # type: ignore[arg-type]
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wmgr"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"wmgr CA on {socket.gethostname()}"),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    log.info("made a new certificate authority in {path}", path=str(cert_path))
    return Authority(cert, key)


def issue_server_cert(ca: Authority, names: list[x509.GeneralName], now: Optional[datetime.datetime] = None,
                      days: int = SERVER_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def needs_renewal(cert: x509.Certificate, names: list[x509.GeneralName], now: Optional[datetime.datetime] = None) -> bool:
    """Renew when fewer than 30 days are left or the wanted names changed."""
    now = now or _now()
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return True
    try:
        current = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    return set(current) != set(names)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server side of TLS. It makes every new connection from the current certificate, so a
    renewed certificate is served from the next connection on, without restarting the listener."""

    def __init__(self, directory: Path, extra_names: Iterable[str] = ()) -> None:
        self.directory = Path(directory)
        self.names = server_names(extra_names)
        self.ca = ensure_ca(self.directory)
        self._options: Optional[ssl.CertificateOptions] = None
        self.cert: Optional[x509.Certificate] = None
        self.renew()

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    def renew(self, now: Optional[datetime.datetime] = None) -> bool:
        """Load the server certificate, making a new one if it is missing or due; True if made."""
        cert_path, key_path = self.directory / "server.pem", self.directory / "server.key"
        made = False
        cert = key = None
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not self._issued_here(cert, key) or needs_renewal(cert, self.names, now):
                cert = None
        if cert is None:
            cert, key = issue_server_cert(self.ca, self.names, now)
            write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
            write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
            log.info("issued a server certificate valid until {until}", until=cert.not_valid_after_utc.isoformat())
            made = True
        if made or self._options is None:
            self.cert = cert
            self._options = ssl.CertificateOptions(
                privateKey=crypto.PKey.from_cryptography_key(key),
                certificate=crypto.X509.from_cryptography(cert),
                extraCertChain=[crypto.X509.from_cryptography(self.ca.cert)],
                acceptableCiphers=TLS12_CIPHERS,
                raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            )
        return made

    def _issued_here(self, cert: x509.Certificate, key: Any) -> bool:
        """Signed by this CA (not merely by one of the same name, as a remade CA would be) and
        matching its key file."""
        try:
            cert.verify_directly_issued_by(self.ca.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return cert.public_key() == key.public_key()

    def renew_if_due(self) -> None:
        """The periodic check; it must never raise into its timer."""
        try:
            if self.cert is None or needs_renewal(self.cert, self.names):
                self.renew()
        except Exception:
            log.failure("could not renew the server certificate")

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        assert self._options is not None
        return SSL.Connection(self._options.getContext(), None)
