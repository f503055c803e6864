"""The PKI of the local control plane, made the way envtest makes it (ECDSA P-256): a CA, the
apiserver's serving certificate, an admin client certificate in system:masters, and the
service-account signing key."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVING_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
SERVING_IPS = ("127.0.0.1", "10.0.0.1")  # 10.0.0.1: first address of --service-cluster-ip-range
VALIDITY = datetime.timedelta(days=3650)  # the dev stack's workdir may live for years


class _File:
    """A read-only attribute of :class:`Certs`: the path of one file in its directory."""

    def __init__(self, filename: str, doc: str | None = None) -> None:
        self.filename = filename
        self.__doc__ = doc

    @overload
    def __get__(self, certs: None, owner: type[Certs]) -> _File: ...

    @overload
    def __get__(self, certs: Certs, owner: type[Certs]) -> Path: ...

    def __get__(self, certs: Certs | None, owner: type[Certs]) -> _File | Path:
        return self if certs is None else certs.directory / self.filename


@dataclass(frozen=True)
class Certs:
    """Paths of the PEM files in one directory."""

    directory: Path

    ca_cert = _File("ca.crt")
    ca_key = _File("ca.key")
    serving_cert = _File("apiserver.crt")
    serving_key = _File("apiserver.key")
    admin_cert = _File("admin.crt")
    admin_key = _File("admin.key")
    sa_key = _File(
        "sa.key",
        """Private key: --service-account-signing-key-file, controller-manager's
        --service-account-private-key-file.""",
    )
    sa_pub = _File("sa.pub", """Public key: --service-account-key-file (verifies tokens).""")

    def all(self) -> list[Path]:
        """Every file, in the order of the attributes above."""
        return [self.directory / f.filename for f in vars(Certs).values() if isinstance(f, _File)]


def write_certs(directory: Path) -> Certs:
    """Create the PKI in ``directory`` unless it is already complete (kubeconfigs embed the CA, so
    it must survive restarts of the stack)."""
    certs = Certs(directory)
    if all(p.is_file() for p in certs.all()):
        return certs
    directory.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("tenancy-devenv-ca")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVING_DNS_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVING_IPS]
    serving_key, serving_cert = _leaf(ca_cert, ca_key, _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, sans)
    admin_name = _name("admin", organization="system:masters")
    admin_key, admin_cert = _leaf(ca_cert, ca_key, admin_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    sa_key = ec.generate_private_key(ec.SECP256R1())

    for path, key in (
        (certs.ca_key, ca_key),
        (certs.serving_key, serving_key),
        (certs.admin_key, admin_key),
        (certs.sa_key, sa_key),
    ):
        _write(path, _key_pem(key), private=True)
    _write(
        certs.sa_pub,
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    # The CA last: its presence marks completion.
    for path, cert in ((certs.serving_cert, serving_cert), (certs.admin_cert, admin_cert), (certs.ca_cert, ca_cert)):
        _write(path, cert.public_bytes(serialization.Encoding.PEM))
    return certs


def _name(common_name: str, *, organization: str | None = None) -> x509.Name:
    """O (if given), then CN."""
    attributes = [] if organization is None else [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)]
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


_UNUSED_KEY_USAGES = dict.fromkeys(("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                                    "encipher_only", "decipher_only"), False)
"""Key usages no certificate here has (signing only; a CA also signs certificates and CRLs)."""


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePublicKey, *, ca: bool
) -> x509.CertificateBuilder:
    """Validity, basic constraints and key usage: a CA signs certificates and CRLs, a leaf only
    signs (ECDSA: no key encipherment)."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clock skew
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, **_UNUSED_KEY_USAGES),
                       critical=True)
    )


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    sans: list[x509.GeneralName],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), ca=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644), "wb") as f:
        f.write(data)
