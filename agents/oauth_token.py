"""The built-in issuer's OAuth 2.1 token endpoint: the client credentials grant for agents.

    POST /oauth/token   grant_type=client_credentials&scope=sql:query
                        &resource=http://127.0.0.1:8000/mcp        (HTTP Basic client auth)
    -> {"access_token": "<JWT>", "token_type": "Bearer", "expires_in": 600, "scope": "sql:query"}
    GET /.well-known/oauth-authorization-server                    (RFC 8414 metadata)

Machine agents have no user to send through a browser, so the grant is client credentials
(RFC 6749 section 4.4). Client secrets are configured only as `sha256:<hex>` digests (the
format of API keys, `expertmesh policy hash-key`) and compared in constant time. A client may
ask for a subset of its allowed scopes (none asked: all of them). The `resource` parameter
(RFC 8707) must name this MCP server when given; the token's audience is always it, so a token
from here is useless anywhere else. Errors are RFC 6749 section 5.2 bodies: `invalid_client`
(401 with a Basic challenge), `unsupported_grant_type`, `invalid_scope`, `invalid_target`,
`invalid_request` (400).
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from expertmesh.policies.keys import hash_api_key

from .agent_auth import JWKS_PATH, TOOL_SCOPES, TokenIssuer

TOKEN_PATH = "/oauth/token"
AS_METADATA_PATH = "/.well-known/oauth-authorization-server"


@dataclass(frozen=True)
class OAuthClient:
    """An agent allowed to use the token endpoint."""

    secret_hash: str
    """`sha256:<hex>` of the client secret."""
    scopes: frozenset[str]
    """Scopes it may be granted."""


def _error(status: int, error: str, description: str) -> JSONResponse:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="expertmesh"'
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=headers
    )


def _client_credentials(request: Request, form: Mapping[str, str]) -> tuple[str, str] | None:
    """(client_id, secret) from HTTP Basic (preferred) or the form body."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("basic "):
        try:
            raw = base64.b64decode(auth[6:].strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        client_id, sep, secret = raw.partition(":")
        return (unquote_plus(client_id), unquote_plus(secret)) if sep else None
    if "client_id" in form and "client_secret" in form:
        return form["client_id"], form["client_secret"]
    return None


def token_app(
    issuer: TokenIssuer,
    resource_url: str,
    clients: Mapping[str, OAuthClient],
    ttl_s: float = 600.0,
) -> Starlette:
    """The token endpoint and the authorization server metadata, as an ASGI app."""
    origin = issuer.issuer

    async def token(request: Request) -> JSONResponse:
        form = {k: str(v) for k, v in (await request.form()).items()}
        credentials = _client_credentials(request, form)
        if credentials is None:
            return _error(401, "invalid_client", "authenticate with HTTP Basic or client_secret")
        client_id, secret = credentials
        client = clients.get(client_id)
        if client is None or not hmac.compare_digest(hash_api_key(secret), client.secret_hash):
            return _error(401, "invalid_client", "unknown client or wrong secret")
        if form.get("grant_type") != "client_credentials":
            return _error(400, "unsupported_grant_type", "only client_credentials is supported")
        resource = form.get("resource")
        if resource is not None and resource.rstrip("/") != resource_url.rstrip("/"):
            return _error(400, "invalid_target", f"this issuer only serves {resource_url}")
        asked = frozenset(form.get("scope", "").split()) or client.scopes
        if not asked <= client.scopes:
            extra = " ".join(sorted(asked - client.scopes))
            return _error(400, "invalid_scope", f"client {client_id!r} may not have: {extra}")
        access = issuer.issue(client_id, resource_url, sorted(asked), ttl_s)
        return JSONResponse(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": int(ttl_s),
                "scope": " ".join(sorted(asked)),
            },
            headers={"Cache-Control": "no-store"},
        )

    async def metadata(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "issuer": origin,
                "token_endpoint": origin + TOKEN_PATH,
                "jwks_uri": origin + JWKS_PATH,
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_basic",
                    "client_secret_post",
                ],
                "scopes_supported": sorted(set(TOOL_SCOPES.values())),
                "response_types_supported": [],
            }
        )

    return Starlette(
        routes=[
            Route(TOKEN_PATH, token, methods=["POST"]),
            Route(AS_METADATA_PATH, metadata, methods=["GET"]),
        ]
    )
