"""The consortium PKI helper: certificates a TLS client accepts (and one it must not), SuperNode
keys in the form Flower loads, file modes, checksums that catch a swapped file. Fast: no Flower
processes (a TLS handshake against a local Python server stands in for the SuperLink)."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flower_focal import pki


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> pki.Consortium:
    return pki.make_consortium(tmp_path_factory.mktemp("pki"), 3, hosts=("127.0.0.1", "localhost", "link.example.org"))


def _handshake(consortium: pki.Consortium, cafile: Path, server_hostname: str) -> str:
    """TLS handshake from a client trusting ``cafile`` to a server presenting the SuperLink
    certificate; returns the negotiated protocol or raises ``ssl.SSLError``."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(consortium.server_cert, consortium.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
            version = tls.version()
            tls.sendall(b"x")
            return str(version)
    finally:
        thread.join(timeout=10)
        listener.close()


def test_clients_trusting_the_ca_accept_the_superlink_for_every_named_host(consortium):
    for host in ("127.0.0.1", "localhost", "link.example.org"):
        assert _handshake(consortium, consortium.ca_cert, host).startswith("TLSv1.")


def test_a_host_not_in_the_certificate_or_another_ca_is_refused(consortium, tmp_path):
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        _handshake(consortium, consortium.ca_cert, "evil.example.org")
    other_ca, _ = pki.make_ca(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError, match="verify failed"):
        _handshake(consortium, other_ca, "127.0.0.1")


def test_certificates_chain_to_the_ca_and_carry_the_hosts_as_sans(consortium):
    ca = x509.load_pem_x509_certificate(consortium.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(consortium.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]


def test_supernode_keys_load_as_flower_loads_them_and_the_pub_file_matches(consortium):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    assert len(consortium.node_keys) == 3
    registered = set()
    for private, public in zip(consortium.node_keys, consortium.node_public_keys, strict=True):
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)  # flower-supernode
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        as_registered = try_load_public_key(public)  # flwr supernode register
        assert as_registered == public_key_to_bytes(key.public_key())
        registered.add(as_registered)
    assert len(registered) == 3  # distinct identities


def test_private_keys_are_owner_only_and_public_files_are_not_secret(consortium):
    for path in consortium.private_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (consortium.ca_cert, consortium.server_cert, *consortium.node_public_keys):
        assert b"PRIVATE" not in path.read_bytes(), path


def test_checksums_list_the_public_files_and_catch_a_swapped_copy(consortium, tmp_path):
    import shutil

    listed = pki.verify_sha256sums(consortium.root)
    assert sorted(listed) == sorted([consortium.ca_cert, consortium.server_cert, *consortium.node_public_keys])
    copy = tmp_path / "copy"
    shutil.copytree(consortium.root, copy)
    other = pki.make_node_key(tmp_path / "attacker" / "node-0")[1]
    (copy / pki.NODES_DIR / "node-0.pub").write_bytes(other.read_bytes())  # a swapped public key
    with pytest.raises(ValueError, match="node-0.pub"):
        pki.verify_sha256sums(copy)
    (copy / pki.NODES_DIR / "node-0.pub").unlink()
    with pytest.raises(ValueError, match="missing"):
        pki.verify_sha256sums(copy)


def test_the_certs_command_writes_a_consortium_and_never_overwrites(tmp_path, capsys):
    import json

    from flower_focal.cli import main

    out = tmp_path / "consortium"
    assert main(["certs", "--out", str(out), "--supernodes", "2", "--hosts", "link.example.org"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["supernodes_get"] == [[str(out / "ca.crt"), str(out / "supernodes" / f"node-{i}")] for i in range(2)]
    assert str(out / "ca.key") == report["keep_offline"] and str(out / "ca.key") not in report["superlink_gets"]
    cert = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["link.example.org"]
    assert len(pki.verify_sha256sums(out)) == 4
    key_before = (out / "supernodes" / "node-0").read_bytes()
    assert main(["certs", "--out", str(out), "--supernodes", "2"]) == 2  # refuses: keys exist
    assert (out / "supernodes" / "node-0").read_bytes() == key_before
