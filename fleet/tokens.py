"""Secrets shown once and stored as SHA-256: device tokens, pairing codes (and buyer API keys)."""

import hashlib
import hmac
import secrets

PAIRING_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, stored_digest: str) -> bool:
    return bool(stored_digest) and hmac.compare_digest(digest(secret), stored_digest)


def new_token(kind: str) -> tuple[str, str]:
    """A token ``<kind>_<prefix>_<secret>``; returns (token, prefix). The prefix finds the row."""
    prefix = secrets.token_hex(4)
    return f"{kind}_{prefix}_{secrets.token_urlsafe(32)}", prefix


def prefix_of(token: str, kind: str) -> str | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != kind or len(parts[1]) != 8:
        return None
    return parts[1]


def new_pairing_code() -> str:
    return "".join(secrets.choice(PAIRING_ALPHABET) for _ in range(8))


def pairing_code_normalise(code: str) -> str:
    """A pairing code as typed (any case, spaces around it, a dash between its halves) as it was issued."""
    return code.strip().upper().replace("-", "")
