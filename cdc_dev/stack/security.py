"""The stack's secrets and certificates: generated on first use, kept under the state directory.

* `secret(layout, name)`: a random password in `<state>/secrets/<name>` (directory 0700, file
  0600), made the first time it is asked for and the same ever after, so a data directory that
  was formatted or provisioned with it keeps working across `stack down`/`up`.
* `certificates(layout)`: for the secured stack (`CDC_STACK_SECURE=1`), a private CA and one
  server certificate for 127.0.0.1 and localhost under `<state>/tls`, in the forms the parts
  read: PEM for Postgres, librdkafka, Python, Quarkus and haproxy; PKCS12 key and trust stores
  for the JVM parts (Kafka, Connect). Made with the `cryptography` package, renewed when missing
  or within a month of expiry.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets as random_source
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cdc_dev.stack.layout import HOST, StackLayout

CERTIFICATE_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, content: str | bytes) -> Path:
    """Written 0600 from the start: a secret (or a config holding one) is never readable by
    others, not even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content.encode() if isinstance(content, str) else content)
    path.chmod(0o600)
    return path


def _secrets_dir(layout: StackLayout) -> Path:
    return layout.root / "secrets"


def secret(layout: StackLayout, name: str) -> str:
    path = _private_dir(_secrets_dir(layout)) / name
    if not path.exists():
        # URL-safe: the value goes into DSNs, JAAS strings and XML without escaping.
        write_private(path, random_source.token_urlsafe(24).encode())
    return path.read_text().strip()


def known_secrets(layout: StackLayout) -> list[str]:
    """Every secret the stack has made so far (none before its first start), for redaction."""
    folder = _secrets_dir(layout)
    if not folder.is_dir():
        return []
    return [f.read_text(errors="replace").strip() for f in folder.iterdir() if f.is_file()]


@dataclass(frozen=True)
class Certificates:
    """Paths of the secured stack's TLS material; `store_password` opens both PKCS12 stores."""

    directory: Path
    store_password: str

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server-key.pem"

    @property
    def server_bundle(self) -> Path:
        """Certificate, CA and key in one file (haproxy's `crt`)."""
        return self.directory / "server-bundle.pem"

    @property
    def keystore(self) -> Path:
        return self.directory / "server-keystore.p12"

    @property
    def truststore(self) -> Path:
        return self.directory / "truststore.p12"

    @property
    def all_files(self) -> list[Path]:
        return [self.ca, self.server_cert, self.server_key, self.server_bundle, self.keystore, self.truststore]


def certificates(layout: StackLayout) -> Certificates:
    """The secured stack's CA and server certificate, made (again) when missing or expiring."""
    made = Certificates(_private_dir(layout.root / "tls"), secret(layout, "tls-store"))
    if not all(path.exists() for path in made.all_files) or _expiring(made.server_cert):
        _generate(made)
    return made


def _expiring(cert_file: Path) -> bool:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < RENEW_BEFORE


def _generate(made: Certificates) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdc-consumer dev stack CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem = ca_cert.public_bytes(pem)
    cert_pem = server_cert.public_bytes(pem)
    key_pem = server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    store_encryption = serialization.BestAvailableEncryption(made.store_password.encode())
    # The CA's key signs once and is dropped: nothing can issue another certificate from it.
    write_private(made.ca, ca_pem)
    write_private(made.server_cert, cert_pem + ca_pem)
    write_private(made.server_key, key_pem)
    write_private(made.server_bundle, cert_pem + ca_pem + key_pem)
    write_private(
        made.keystore,
        pkcs12.serialize_key_and_certificates(b"server", server_key, server_cert, [ca_cert], store_encryption),
    )
    write_private(
        made.truststore,
        pkcs12.serialize_java_truststore([pkcs12.PKCS12Certificate(ca_cert, b"ca")], store_encryption),
    )
