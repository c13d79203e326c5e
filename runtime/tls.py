"""TLS material for HTTP/3: the cluster CA and this node's leaf certificate.

The cluster CA is *derived*, not stored: its P-256 private key comes from the
cluster secret through HKDF (:meth:`ClusterSecret.ca_key_seed`), and its
certificate has a fixed subject, serial and validity and is signed with
deterministic ECDSA (RFC 6979). So every member holding the secret builds the
same CA certificate byte for byte, nobody copies a CA key, and old join tokens
(which carry the secret) keep working unchanged. The CA key never touches the disk.

Under ``$OMX_HOME/tls/``: ``ca.crt`` (the CA, PEM, public), ``node.crt`` (the
leaf, then the CA) and ``node.key`` (the leaf's own random P-256 key, mode
0600). The leaf is ``CA:FALSE``, EKU serverAuth, with a SAN naming every name
and address the node serves and advertises. :func:`ensure_tls` rewrites the
files when the secret changed (another cluster's CA), when the leaf lacks a
name, was not issued by the current CA, or is close to expiry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from omx.fsutil import atomic_write
from omx.mesh import ClusterSecret

__all__ = ["TlsFiles", "cluster_ca", "ensure_tls", "leaf_names", "tls_dir"]

_CA_NOT_BEFORE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
_CA_NOT_AFTER = dt.datetime(2125, 1, 1, tzinfo=dt.UTC)
_LEAF_DAYS = 397
_RENEW_BEFORE = dt.timedelta(days=30)
# The P-256 group order: the derived private scalar must lie in [1, n-1].
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files a node serves HTTP/3 with."""

    ca_cert: Path
    cert: Path
    key: Path


def tls_dir(home: Path) -> Path:
    return home / "tls"


def _ca_key(secret: ClusterSecret) -> ec.EllipticCurvePrivateKey:
    scalar = int.from_bytes(secret.ca_key_seed(), "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


def cluster_ca(secret: ClusterSecret) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The cluster CA's key and certificate: the same bytes on every node with ``secret``."""
    key = _ca_key(secret)
    fingerprint = secret.fingerprint()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "omx"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"omx cluster CA {fingerprint}")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(public)
        .serial_number(int(fingerprint, 16) | 1)
        .not_valid_before(_CA_NOT_BEFORE).not_valid_after(_CA_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    return key, cert


def leaf_names(hosts: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split the names a node answers to into (DNS names, IP addresses), wildcards expanded.

    ``localhost``, the loopback addresses and the machine's host name are always
    included; a wildcard bind adds every interface address.
    """
    dns: dict[str, None] = dict.fromkeys(["localhost"])
    ips: dict[str, None] = dict.fromkeys(["127.0.0.1", "::1"])
    hostname = socket.gethostname()
    if hostname:
        dns[hostname.lower()] = None
    for host in hosts:
        host = host.strip("[]")
        if not host:
            continue
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            dns[host.lower()] = None
            continue
        if addr.is_unspecified:
            for ip in _interface_ips():
                ips[ip] = None
        else:
            ips[str(addr)] = None
    return list(dns), list(ips)


def _interface_ips() -> list[str]:
    import psutil

    found = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    found.append(str(ipaddress.ip_address(addr.address.split("%", 1)[0])))
                except ValueError:
                    continue
    return found


def _issue_leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, node_id: str,
                dns: list[str], ips: list[str], now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey,
                                                                             x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    san: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "omx"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _leaf_ok(files: TlsFiles, ca: x509.Certificate, dns: list[str], ips: list[str], now: dt.datetime) -> bool:
    """True when the existing leaf is issued by ``ca``, names everything and is not near expiry."""
    try:
        if files.ca_cert.read_bytes() != ca.public_bytes(serialization.Encoding.PEM):
            return False
        leaf = x509.load_pem_x509_certificates(files.cert.read_bytes())[0]
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        leaf.verify_directly_issued_by(ca)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    if key.public_key() != leaf.public_key():
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return (set(dns) <= have_dns and set(ips) <= have_ips
            and leaf.not_valid_after_utc - _RENEW_BEFORE > now)


def ensure_tls(home: Path, secret: ClusterSecret, node_id: str, hosts: Iterable[str],
               *, now: dt.datetime | None = None) -> TlsFiles:
    """Write (or keep) ``ca.crt``, ``node.crt`` and ``node.key`` under ``home/tls`` (blocking)."""
    now = now or dt.datetime.now(dt.UTC)
    folder = tls_dir(home)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = TlsFiles(ca_cert=folder / "ca.crt", cert=folder / "node.crt", key=folder / "node.key")
    ca_key, ca = cluster_ca(secret)
    dns, ips = leaf_names(hosts)
    if _leaf_ok(files, ca, dns, ips, now):
        return files
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    key, leaf = _issue_leaf(ca_key, ca, node_id, dns, ips, now)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # Key first: a crash between the writes leaves a mismatch that the next start repairs.
    atomic_write(files.key, key_pem, mode=0o600)
    atomic_write(files.cert, leaf.public_bytes(serialization.Encoding.PEM) + ca_pem, mode=0o644)
    atomic_write(files.ca_cert, ca_pem, mode=0o644)
    return files
