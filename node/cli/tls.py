"""`infernode tls selfsigned`: a certificate and key for a box without a CA (the `cryptography` package's one home)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

import typer
from rich.markup import escape

from node.cli.root import app, console
from node.errors import OperationFailed

tls_app = typer.Typer(no_args_is_help=True, help="TLS for the node's port ([node] tls_cert, tls_key).")
app.add_typer(tls_app, name="tls")

DAYS = 825  # the longest validity clients such as Apple's accept for a server certificate


def selfsigned(names: list[str], days: int = DAYS) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): an ECDSA P-256 certificate for names (DNS names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # A CA and a server certificate at once, so clients can trust this file as their CA bundle.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@tls_app.command("selfsigned")
def selfsigned_cmd(
    name: list[str] | None = typer.Option(None, "--name", help="a DNS name or IP address clients use (repeatable); "
                                             "default: this host's name, localhost, 127.0.0.1, ::1"),
    out: Path = typer.Option(Path("."), "--out", help="folder to write node.crt and node.key into"),
    days: int = typer.Option(DAYS, "--days", min=1, max=3650, help="validity in days"),
    force: bool = typer.Option(False, "--force", help="replace existing files"),
) -> None:
    """Write a self-signed certificate (node.crt) and its key (node.key, mode 0600)."""
    names = list(dict.fromkeys(name or [socket.gethostname(), "localhost", "127.0.0.1", "::1"]))
    cert_path, key_path = out / "node.crt", out / "node.key"
    for p in (cert_path, key_path):
        if p.exists() and not force:
            raise OperationFailed(f"{p} exists; pass --force to replace it")
    cert_pem, key_pem = selfsigned(names, days)
    out.mkdir(parents=True, exist_ok=True)
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert_pem)
    console.print(f"wrote {cert_path} and {key_path} for {', '.join(names)} (valid {days} days)", highlight=False)
    console.print('in appliance.toml, ' + escape('[node]') + f': tls_cert = "{cert_path.resolve()}"  tls_key = "{key_path.resolve()}"',
                  highlight=False, soft_wrap=True)
    console.print(f"clients trust it with e.g. SSL_CERT_FILE={cert_path.resolve()} or curl --cacert", highlight=False,
                  soft_wrap=True)
