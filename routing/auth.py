"""API-key authentication against the policy's tenants.

The presented key is hashed (SHA-256, `expertmesh.policies.keys`) and compared with every
stored digest using `hmac.compare_digest`, without stopping at a match, so the time taken does
not depend on which digest matched or how many leading characters agreed.
"""

from __future__ import annotations

import hmac

from expertmesh.policies.keys import hash_api_key
from expertmesh.policies.policy import Policy, Tenant

from .errors import Unauthorized


def authenticate(policy: Policy, api_key: str | None) -> Tenant:
    """The tenant owning `api_key`; with no key, the policy's anonymous tenant if it has one.
    Raises `Unauthorized` (HTTP 401) otherwise. A wrong key is never downgraded to
    anonymous."""
    if not api_key:
        if policy.anonymous_tenant is not None:
            tenant = policy.tenant(policy.anonymous_tenant)
            assert tenant is not None  # validated by load_policy
            return tenant
        raise Unauthorized(
            "no API key; send `Authorization: Bearer <key>` (this policy has no anonymous_tenant)"
        )
    digest = hash_api_key(api_key)
    found: Tenant | None = None
    for tenant in policy.tenants:
        for stored in tenant.key_hashes:
            if hmac.compare_digest(stored, digest):
                found = tenant
    if found is None:
        raise Unauthorized("invalid API key; check the key, or ask for one to be issued")
    return found
