"""Certificates and SuperNode keys for a test consortium (TLS + SuperNode authentication).

Flower 1.42's SuperLink serves the Fleet, Control and Runtime APIs over HTTPS when given
``--ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``; SuperNodes verify it with
``--root-certificates``. With ``--enable-supernode-auth`` only SuperNodes whose public key was
registered through the Control API (``flwr supernode register KEY.pub <connection>``) may
activate; each request is signed with the node's EC private key
(``--auth-supernode-private-key``, OpenSSH format, NIST curve).

:func:`make_consortium` writes, with the ``cryptography`` package::

    DIR/ca.crt                  CA certificate             -> every party (trust anchor)
    DIR/ca.key                  CA private key             -> nobody: keep offline (or delete)
    DIR/superlink.crt           SuperLink certificate      -> SuperLink host
    DIR/superlink.key           SuperLink TLS private key  -> SuperLink host only
    DIR/supernodes/node-I       SuperNode I private key    -> institution I only
    DIR/supernodes/node-I.pub   SuperNode I public key     -> SuperLink operator (register)
    DIR/SHA256SUMS              checksums of the public files, to verify copies

This is a self-signed CA meant for a test consortium or a pilot; a production consortium uses
its own PKI (the SuperLink certificate must name the address SuperNodes dial, as a SAN).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "superlink.crt", "superlink.key"
NODES_DIR = "supernodes"
CHECKSUMS = "SHA256SUMS"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Consortium:
    """Paths of what :func:`make_consortium` wrote."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path] = field(default_factory=list)  # private (institution side)

    @property
    def node_public_keys(self) -> list[Path]:
        return [p.with_name(p.name + ".pub") for p in self.node_keys]

    @property
    def private_files(self) -> list[Path]:
        """Every private key: none may appear on a host that should not hold it."""
        return [self.ca_key, self.server_key, *self.node_keys]


def _write(path: Path, data: bytes, *, private: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_ca(out: Path, *, name: str = "flower-focal test consortium CA", days: int = 365) -> tuple[Path, Path]:
    """A self-signed CA (P-384): ``ca.crt`` and ``ca.key`` (0600) in ``out``."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return (_write(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), private=False),
            _write(out / CA_KEY, _pem_key(key), private=True))


def make_server_cert(out: Path, ca_cert: Path, ca_key: Path, hosts: Sequence[str] = DEFAULT_HOSTS,
                     *, days: int = 365) -> tuple[Path, Path]:
    """The SuperLink's TLS certificate for ``hosts`` (IPs or DNS names, as SANs), signed by the CA."""
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or IP")
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False)
        .sign(signer, hashes.SHA384())
    )
    return (_write(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), private=False),
            _write(out / SERVER_KEY, _pem_key(key), private=True))


def make_node_key(path: Path, comment: str = "") -> tuple[Path, Path]:
    """A SuperNode authentication key pair (P-384, OpenSSH format): ``path`` (private, 0600)
    and ``path.pub`` (what the SuperLink operator registers)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode()
    return (_write(path, private, private=True),
            _write(path.with_name(path.name + ".pub"), public + b"\n", private=False))


def sha256sums(root: Path, files: Sequence[Path]) -> Path:
    """``sha256sum -c``-compatible checksums of ``files`` (paths relative to ``root``)."""
    lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(root)}\n" for f in files]
    return _write(root / CHECKSUMS, "".join(lines).encode(), private=False)


def verify_sha256sums(root: Path, checksums: Path | None = None) -> list[Path]:
    """Check every file listed in ``SHA256SUMS`` (as ``sha256sum -c`` would); returns them.

    Raises
    ------
    ValueError
        If a listed file is missing or its digest differs (a tampered or swapped copy).
    """
    checked = []
    for line in (checksums or root / CHECKSUMS).read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = root / name.strip().lstrip("*")
        if not path.is_file():
            raise ValueError(f"{path} is listed in {CHECKSUMS} but missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{path} does not match its checksum")
        checked.append(path)
    return checked


def make_consortium(out: Path, supernodes: int, hosts: Sequence[str] = DEFAULT_HOSTS,
                    *, days: int = 365) -> Consortium:
    """CA, SuperLink certificate for ``hosts`` and ``supernodes`` node key pairs under ``out``."""
    if supernodes < 0:
        raise ValueError("supernodes must be >= 0")
    out = Path(out)
    ca_cert, ca_key = make_ca(out, days=days)
    server_cert, server_key = make_server_cert(out, ca_cert, ca_key, hosts, days=days)
    nodes = [make_node_key(out / NODES_DIR / f"node-{i}", f"node-{i}")[0] for i in range(supernodes)]
    consortium = Consortium(out, ca_cert, ca_key, server_cert, server_key, nodes)
    sha256sums(out, [ca_cert, server_cert, *consortium.node_public_keys])
    return consortium
