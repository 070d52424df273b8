"""API keys are stored in a policy only as `sha256:<hex>` digests.

SHA-256 without a salt is the right tool for API keys (unlike passwords): the keys we issue are
random with at least 128 bits of entropy, so a dictionary or brute-force attack on the digest
is hopeless, and an unsalted digest lets the policy file be reviewed and diffed. Comparison
happens in `expertmesh.routing.auth` with `hmac.compare_digest` (constant time).
"""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk-expertmesh-"


def hash_api_key(api_key: str) -> str:
    """The digest to put in a tenant's `api_key_hashes`."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    """A fresh key: the prefix plus 32 random bytes (256 bits), URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)
