"""Agent authorisation for the MCP server: a small built-in token issuer, the bearer-token
verifier, per-tool scopes and the agent -> tenant map.

    issuer = TokenIssuer("http://127.0.0.1:8000")                  # Ed25519 key, kid "k1"
    token = issuer.issue("agent-reporting", audience="http://127.0.0.1:8000/mcp",
                         scopes=["sql:query"], ttl_s=600)
    verifier = JwtVerifier(issuer.issuer, audience="http://127.0.0.1:8000/mcp",
                           keys=issuer.public_keys)                # or jwks_url=... of any issuer
    issuer.rotate()    # new signing key and kid; old tokens verify until the old key is dropped

Tokens are JWTs (EdDSA/Ed25519 from `issue`; RS256 is accepted too, for standard issuers)
with `iss`, `sub`, `client_id`, `aud` (the MCP server's resource URL, RFC 8707), `scope`
(space-separated), `iat`, `exp` and a `kid` header. `JwtVerifier` implements the SDK's
`TokenVerifier`: a token with a bad signature, unknown `kid`, other issuer, other audience or
past `exp` verifies to None, which the SDK answers with 401 and a `WWW-Authenticate` header
naming the protected resource metadata.

The built-in issuer only mints tokens (from Python or `expertmesh` tooling); it is not an
OAuth authorization server with a token endpoint. Any standard issuer (Keycloak, Entra ID,
Auth0, ...) that puts the resource URL in `aud` can be configured instead through its JWKS.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp.server.auth.provider import AccessToken

ALGORITHMS = ["EdDSA", "RS256"]

# Which scope each MCP tool needs. A token may list several; the server checks per call.
TOOL_SCOPES: Mapping[str, str] = {
    "chat_completion": "chat:complete",
    "text_to_sql": "sql:query",
    "cluster_status": "cluster:read",
}


class AgentAuthError(Exception):
    """Agent authorisation is misconfigured (not a refused token: those are HTTP answers)."""


@dataclass
class _Key:
    kid: str
    private: Ed25519PrivateKey
    created_s: float


class TokenIssuer:
    """Signs agent tokens with Ed25519; keeps retired keys' public halves for verification
    until `drop_retired` so that rotation does not invalidate live tokens."""

    def __init__(self, issuer: str, clock: Callable[[], float] = time.time) -> None:
        self.issuer = issuer.rstrip("/")
        self._clock = clock
        self._keys: list[_Key] = []
        self._n = 0
        self.rotate()

    @classmethod
    def from_key_file(
        cls, issuer: str, path: str | Path, clock: Callable[[], float] = time.time
    ) -> TokenIssuer:
        """An issuer signing with the Ed25519 key in `path` (PEM, PKCS#8), created (mode 0600)
        when missing, so that server replicas and the token CLI share one key. The kid is
        derived from the public key."""
        path = Path(path).expanduser()
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise AgentAuthError(f"{path} is not an Ed25519 private key")
        else:
            key = Ed25519PrivateKey.generate()
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        issuer_ = cls(issuer, clock)
        issuer_._keys = [_Key("k-" + hashlib.sha256(raw).hexdigest()[:12], key, clock())]
        return issuer_

    @property
    def current_kid(self) -> str:
        return self._keys[-1].kid

    def rotate(self) -> str:
        """Start signing with a new key; returns its kid."""
        self._n += 1
        key = _Key(f"k{self._n}", Ed25519PrivateKey.generate(), self._clock())
        self._keys.append(key)
        return key.kid

    def drop_retired(self, keep: int = 1) -> None:
        """Forget all but the newest `keep` keys (tokens they signed stop verifying)."""
        self._keys = self._keys[-max(1, keep) :]

    def public_keys(self) -> dict[str, Any]:
        """kid -> public key, for `JwtVerifier(keys=...)`."""
        return {k.kid: k.private.public_key() for k in self._keys}

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWK Set (RFC 7517), served at the JWKS endpoint."""
        out = []
        for k in self._keys:
            jwk = jwt.algorithms.OKPAlgorithm.to_jwk(k.private.public_key(), as_dict=True)
            out.append({**jwk, "kid": k.kid, "use": "sig", "alg": "EdDSA"})
        return {"keys": out}

    def issue(
        self,
        subject: str,
        audience: str,
        scopes: Iterable[str],
        ttl_s: float = 600.0,
        client_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed access token for agent `subject`, valid for `audience` only."""
        now = int(self._clock())
        claims = {
            **(extra or {}),
            "iss": self.issuer,
            "sub": subject,
            "client_id": client_id or subject,
            "aud": audience,
            "scope": " ".join(scopes),
            "iat": now,
            "exp": now + int(ttl_s),
            "jti": uuid.uuid4().hex,
        }
        key = self._keys[-1]
        return jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid})


class JwtVerifier:
    """The SDK's `TokenVerifier` over JWTs: signature (by `kid`), `iss`, `aud` and `exp`.

    Keys come from `keys` (a kid -> public key mapping, or a callable returning one, e.g. the
    built-in issuer's `public_keys`) or from `jwks_url` (any standard issuer)."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        keys: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
        jwks_url: str | None = None,
        leeway_s: float = 0.0,
    ) -> None:
        if (keys is None) == (jwks_url is None):
            raise AgentAuthError("JwtVerifier needs exactly one of keys or jwks_url")
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self._keys = keys
        self._jwks = jwt.PyJWKClient(jwks_url) if jwks_url else None
        self.leeway_s = leeway_s

    def _key_for(self, token: str) -> Any:
        if self._jwks is not None:
            return self._jwks.get_signing_key_from_jwt(token).key
        kid = jwt.get_unverified_header(token).get("kid")
        keys = self._keys() if callable(self._keys) else self._keys
        assert keys is not None
        if not isinstance(kid, str) or kid not in keys:
            raise jwt.InvalidKeyError(f"unknown kid {kid!r}")
        return keys[kid]

    def decode(self, token: str) -> dict[str, Any]:
        """The verified claims; raises `jwt.InvalidTokenError` (expired, wrong audience, ...)."""
        return jwt.decode(
            token,
            self._key_for(token),
            algorithms=ALGORITHMS,
            audience=self.audience,
            issuer=self.issuer,
            leeway=self.leeway_s,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            if self._jwks is not None:  # a JWKS cache miss fetches over HTTP: not on the loop
                claims = await asyncio.to_thread(self.decode, token)
            else:
                claims = self.decode(token)
        except jwt.PyJWTError:  # bad signature, unknown kid, expired, wrong aud or iss, ...
            return None
        scope = claims.get("scope", "")
        return AccessToken(
            token=token,
            client_id=str(claims.get("client_id") or claims.get("azp") or claims["sub"]),
            scopes=scope.split() if isinstance(scope, str) else list(scope),
            expires_at=int(claims["exp"]),
            resource=self.audience,
            subject=str(claims["sub"]),
            claims={k: v for k, v in claims.items() if k in ("iss", "act", "jti")},
        )


@dataclass(frozen=True)
class AgentDirectory:
    """Agent identity (token `client_id`, else `sub`) -> selector tenant and SQL table scope."""

    tenants: Mapping[str, str]
    sql_tables: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Per agent, the tables text_to_sql may read; an agent not listed may read every table."""
    default_tenant: str | None = None
    """Tenant of agents not in `tenants`; None: they are refused."""

    def tenant_for(self, agent: str) -> str:
        tenant = self.tenants.get(agent, self.default_tenant)
        if tenant is None:
            raise PermissionError(
                f"agent {agent!r} is not mapped to a tenant; add it to the MCP server's agents "
                "map (agent -> tenant) or set mcp.default_tenant"
            )
        return tenant

    def tables_for(self, agent: str) -> frozenset[str] | None:
        return self.sql_tables.get(agent)


def main(argv: list[str] | None = None) -> int:
    """Mint a token with the built-in issuer's key file (what `McpSpec.key_file` names)."""
    import argparse

    parser = argparse.ArgumentParser(description="issue an agent token (built-in issuer)")
    parser.add_argument("command", choices=["issue"])
    parser.add_argument(
        "--resource", required=True, help="the MCP URL, e.g. http://127.0.0.1:8000/mcp"
    )
    parser.add_argument("--issuer", default=None, help="default: the resource URL's origin")
    parser.add_argument("--key-file", default="~/.expertmesh/mcp-issuer.pem")
    parser.add_argument("--agent", required=True)
    parser.add_argument(
        "--scope", action="append", default=[], help=f"one of {sorted(set(TOOL_SCOPES.values()))}"
    )
    parser.add_argument("--ttl-s", type=float, default=3600.0)
    args = parser.parse_args(argv)
    issuer = TokenIssuer.from_key_file(args.issuer or origin_of(args.resource), args.key_file)
    print(issuer.issue(args.agent, args.resource, args.scope, args.ttl_s))
    return 0


JWKS_PATH = "/.well-known/jwks.json"
"""Where the built-in issuer's public keys are served (relative to its origin)."""


def origin_of(url: str) -> str:
    """scheme://host[:port] of `url`."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


if __name__ == "__main__":
    raise SystemExit(main())
