"""WireGuard keys: X25519 key pairs and preshared keys, encoded exactly as `wg genkey`/`wg pubkey`/`wg genpsk`.

Keys are made in-process with `cryptography` so no shell-out (and no key on a command line or in a
pipe) is needed. Private keys are written 0600 and never logged.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_LEN = 32  # Curve25519 scalars and points are 32 bytes (RFC 7748 5)


class InvalidKeyError(ValueError):
    """A string that is not a base64-encoded 32-byte WireGuard key."""


def _clamp(raw: bytearray) -> bytes:
    # RFC 7748 5 "decodeScalar25519": wg genkey stores the scalar already clamped, so a key we
    # generate looks like one `wg genkey` would have printed (X25519 clamps again internally).
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return bytes(raw)


def decode_key(key: str) -> bytes:
    """The 32 raw bytes of a base64 key; ``InvalidKeyError`` when it is not one."""
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError, AttributeError):
        raise InvalidKeyError("not a base64 WireGuard key") from None
    if len(raw) != KEY_LEN:
        raise InvalidKeyError(f"a WireGuard key is {KEY_LEN} bytes, this one is {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    if len(raw) != KEY_LEN:
        raise InvalidKeyError(f"a WireGuard key is {KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


def generate_private_key() -> str:
    """A new private key, base64, clamped like `wg genkey` output."""
    return encode_key(_clamp(bytearray(secrets.token_bytes(KEY_LEN))))


def public_key(private_key: str) -> str:
    """The public key of a base64 private key, as `wg pubkey` prints it."""
    priv = X25519PrivateKey.from_private_bytes(decode_key(private_key))
    return encode_key(priv.public_key().public_bytes_raw())


def generate_preshared_key() -> str:
    """A new preshared key (32 random bytes, base64), as `wg genpsk` prints it."""
    return encode_key(secrets.token_bytes(KEY_LEN))


def to_hex(key: str) -> str:
    """Base64 key → lowercase hex, the form the cross-platform UAPI (wireguard-go) speaks."""
    return decode_key(key).hex()


def from_hex(value: str) -> str:
    try:
        return encode_key(bytes.fromhex(value))
    except ValueError:
        raise InvalidKeyError("not a hex WireGuard key") from None


def write_secret(path: str | os.PathLike[str], text: str) -> None:
    """Write a secret file atomically with mode 0600 from the start (never briefly world-readable).

    The backend's convention for this is backend.durable.write_secret; this copy stays because
    wireguard/ also runs on the gateway host, and gateway code may not import the backend.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # umask cannot widen it, but a pre-set ACL default could: be explicit
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_or_create_private_key(path: str | os.PathLike[str]) -> tuple[str, bool]:
    """The private key stored at ``path`` (created 0600 when absent); returns (key, created)."""
    path = Path(path)
    if path.exists():
        key = path.read_text().strip()
        decode_key(key)
        return key, False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    write_secret(path, key + "\n")
    return key, True
