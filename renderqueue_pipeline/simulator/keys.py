"""Key material the simulator keeps under `$RENDERQUEUE_HOME/simulator/`.

Everything is created once and reused: the TLS certificate (so a client's
SSL_CERT_FILE stays valid across restarts), the Ed25519 webhook key (so a
receiver's cached JWKS stays valid), the CDN URL signing secret and the
account's API keys (a plain key and an admin key, as fal has).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only, atomically."""
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _cert_is_usable(cert_path: Path, key_path: Path) -> bool:
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    has_ip = ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    has_dns = "localhost" in san.get_values_for_type(x509.DNSName)
    fresh = cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    return has_ip and has_dns and fresh


def ensure_tls_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if _cert_is_usable(cert_path, key_path):
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "renderqueue fal simulator")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    tmp = cert_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, cert_path)
    return cert_path, key_path


def _load_or_create_key(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, Ed25519PrivateKey):
            return key
    key = Ed25519PrivateKey.generate()
    _write_key(path, key)
    return key


def _write_key(path: Path, key: Ed25519PrivateKey) -> None:
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class WebhookSigner:
    """Signs webhook deliveries like fal (Ed25519 over id, user, timestamp, body hash).

    Holds two keys, as fal's JWKS does: the signing key and the one before it. The
    signing key's `x` is published with base64 padding (`...=`), the other without, so a
    receiver that cannot read either spelling fails its tests. `rotate()` makes a new
    signing key and keeps the previous one published.
    """

    CURRENT = "webhook_ed25519.pem"
    PREVIOUS = "webhook_ed25519.previous.pem"

    def __init__(
        self, current: Ed25519PrivateKey, previous: Ed25519PrivateKey, directory: Path | None
    ) -> None:
        self.private_key = current
        self.previous_key = previous
        self.directory = directory

    @classmethod
    def load_or_create(cls, directory: Path) -> WebhookSigner:
        directory.mkdir(parents=True, exist_ok=True)
        current = _load_or_create_key(directory / cls.CURRENT)
        previous = _load_or_create_key(directory / cls.PREVIOUS)
        return cls(current, previous, directory)

    @property
    def public_bytes(self) -> bytes:
        return _raw_public(self.private_key)

    def rotate(self) -> None:
        """A new signing key; the old signing key stays published, the oldest is dropped."""
        new = Ed25519PrivateKey.generate()
        if self.directory is not None:
            _write_key(self.directory / self.PREVIOUS, self.private_key)
            _write_key(self.directory / self.CURRENT, new)
        self.previous_key, self.private_key = self.private_key, new

    def jwks(self) -> dict:
        """The JWKS document fal serves at /.well-known/jwks.json (two keys)."""
        keys = []
        for key, padded in ((self.previous_key, False), (self.private_key, True)):
            raw = _raw_public(key)
            x = base64.urlsafe_b64encode(raw).decode("ascii")
            keys.append(
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": x if padded else x.rstrip("="),
                    "kid": hashlib.sha256(raw).hexdigest()[:16],
                    "use": "sig",
                }
            )
        return {"keys": keys}

    def sign(self, request_id: str, user_id: str, timestamp: str, body: bytes) -> str:
        """Hex signature of `request_id\\nuser_id\\ntimestamp\\nsha256_hex(body)`."""
        message = "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()])
        return self.private_key.sign(message.encode("utf-8")).hex()


@dataclass(frozen=True)
class UrlSigner:
    """HMAC signatures for expiring CDN URLs (the simulator's stand-in for fal's signed URLs)."""

    secret: bytes

    @classmethod
    def load_or_create(cls, directory: Path) -> UrlSigner:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "cdn_secret"
        if path.exists() and path.stat().st_size >= 32:
            return cls(path.read_bytes())
        secret = secrets.token_bytes(32)
        _write_private(path, secret)
        return cls(secret)

    def signature(self, path: str, expires: int) -> str:
        return hmac.new(self.secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def verify(self, path: str, expires: int, signature: str) -> bool:
        return hmac.compare_digest(self.signature(path, expires), signature)


@dataclass(frozen=True)
class ApiKeys:
    """The simulated fal account's two keys: a plain API key and an admin key.

    Made once per home (`api_keys.json`, owner-only) so the export lines a shell or a
    deployment took stay valid across restarts. fal refuses a wrong key (401) and a
    plain key where an admin key is needed (Platform APIs, delete_io: 403); with a key
    generated here, not a fixed default, a product that sends the wrong one fails its tests.
    """

    fal_key: str
    admin_key: str

    FILE = "api_keys.json"

    @classmethod
    def load_or_create(cls, directory: Path) -> ApiKeys:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / cls.FILE
        if (found := cls._read(path)) is not None:
            return found
        keys = cls(_new_key("sim"), _new_key("sim-admin"))
        data = json.dumps({"fal_key": keys.fal_key, "admin_key": keys.admin_key}).encode()
        if path.exists():  # unreadable: replace it
            _write_private(path, data)
            return keys
        # first start: two processes (a server and `simulator env`) may race; the first
        # file wins, so every process ends up with the same keys
        tmp = path.with_suffix(f".{os.getpid()}.{secrets.token_hex(4)}.new")
        _write_private(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            keys = cls._read(path) or keys
        finally:
            tmp.unlink(missing_ok=True)
        return keys

    @classmethod
    def _read(cls, path: Path) -> ApiKeys | None:
        try:
            data = json.loads(path.read_text())
            keys = cls(str(data["fal_key"]), str(data["admin_key"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return keys if keys.fal_key and keys.admin_key and keys.fal_key != keys.admin_key else None


def _new_key(prefix: str) -> str:
    """`<key id>:<secret>`, the shape of a fal key."""
    return f"{prefix}-{secrets.token_hex(8)}:{secrets.token_hex(24)}"


def key_refusal(presented: str, *, plain: str, admin: str, admin_needed: bool) -> int | None:
    """None when `presented` may make the call, else fal's status: 401 for a key the
    account does not have, 403 for its plain key on an admin-only call."""
    if hmac.compare_digest(presented.encode(), admin.encode()):
        return None
    if hmac.compare_digest(presented.encode(), plain.encode()):
        return 403 if admin_needed else None
    return 401
