"""Certificates for the security tests, made with ``cryptography``: a CA, a server certificate for
localhost / 127.0.0.1, client certificates (CN only, or with SANs), one from another CA, and an
expired one. EC P-256 keys: quick to make, and what hospitals' PKIs commonly issue.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM bytes and as files."""

    cert_pem: bytes
    key_pem: bytes
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Authority:
    """A self-signed CA that issues server and client certificates into ``folder``."""

    def __init__(self, folder: Path, name: str = "ecgx test CA"):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.path = folder / "ca.pem"
        self.path.write_bytes(self.pem)

    def issue(
        self,
        stem: str,
        cn: str,
        *,
        dns: tuple[str, ...] = (),
        uris: tuple[str, ...] = (),
        emails: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
        days: tuple[int, int] = (-1, 30),
    ) -> Issued:
        """A certificate for ``cn`` valid from ``days[0]`` to ``days[1]`` days from now."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.RFC822Name(e) for e in emails]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + timedelta(days=days[0]))
            .not_valid_after(now + timedelta(days=days[1]))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_pem, key_pem = cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
        cert_path, key_path = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        key_path.chmod(0o600)
        return Issued(cert_pem, key_pem, cert_path, key_path)

    def server(self, stem: str = "server", days: tuple[int, int] = (-1, 30)) -> Issued:
        return self.issue(stem, "localhost", dns=("localhost",), ips=("127.0.0.1",), server=True, days=days)


@dataclass(frozen=True)
class Pki:
    """Everything the security tests need, in one folder."""

    ca: Authority
    other_ca: Authority
    server: Issued
    client: Issued  # CN "ward-7-viewer", no SAN
    client_san: Issued  # CN "ignored-cn", SANs dns pacs.hospital.example, uri, email
    unlisted: Issued  # signed by the CA, not in any access file
    foreign: Issued  # CN "ward-7-viewer", signed by the other CA
    expired: Issued  # a server certificate that expired yesterday


def make_pki(folder: Path) -> Pki:
    ca = Authority(folder / "ca")
    other = Authority(folder / "other", "another CA")
    return Pki(
        ca=ca,
        other_ca=other,
        server=ca.server(),
        client=ca.issue("client", "ward-7-viewer"),
        client_san=ca.issue(
            "client-san",
            "ignored-cn",
            dns=("pacs.hospital.example",),
            uris=("spiffe://hospital/pacs",),
            emails=("pacs@hospital.example",),
        ),
        unlisted=ca.issue("unlisted", "someone-else"),
        foreign=other.issue("foreign", "ward-7-viewer"),
        expired=ca.server("expired", days=(-30, -1)),
    )
