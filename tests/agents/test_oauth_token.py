"""The built-in issuer's token endpoint (client credentials grant, RFC 6749 4.4 / RFC 8707)."""

from __future__ import annotations

import base64

import pytest
from starlette.testclient import TestClient

from expertmesh.agents.agent_auth import JwtVerifier, TokenIssuer
from expertmesh.agents.config import parse_platform_config
from expertmesh.agents.oauth_token import OAuthClient, token_app
from expertmesh.policies.keys import hash_api_key
from expertmesh.serving.config import ServingConfigError

ORIGIN = "http://127.0.0.1:8000"
RESOURCE = ORIGIN + "/mcp"


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer(ORIGIN)


@pytest.fixture
def client(issuer: TokenIssuer) -> TestClient:
    clients = {
        "agent-analyst": OAuthClient(
            hash_api_key("s3cret"), frozenset({"sql:query", "cluster:read"})
        )
    }
    return TestClient(token_app(issuer, RESOURCE, clients, ttl_s=300))


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def test_client_credentials_give_an_audience_bound_token_with_the_asked_scopes(client, issuer):
    form = {"grant_type": "client_credentials", "scope": "sql:query", "resource": RESOURCE}
    r = client.post("/oauth/token", data=form, headers=basic("agent-analyst", "s3cret"))
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300
    assert body["scope"] == "sql:query"
    claims = JwtVerifier(ORIGIN, RESOURCE, keys=issuer.public_keys).decode(body["access_token"])
    assert claims["client_id"] == "agent-analyst" and claims["aud"] == RESOURCE
    # no scope asked: every scope the client may have; secret in the form body also works
    form = {
        "grant_type": "client_credentials",
        "client_id": "agent-analyst",
        "client_secret": "s3cret",
    }
    assert client.post("/oauth/token", data=form).json()["scope"] == "cluster:read sql:query"


@pytest.mark.parametrize(
    ("form", "headers", "status", "error"),
    [
        ({"grant_type": "client_credentials"}, basic("agent-analyst", "wrong"), 401, "invalid_client"),
        ({"grant_type": "client_credentials"}, basic("nobody", "s3cret"), 401, "invalid_client"),
        ({"grant_type": "client_credentials"}, {}, 401, "invalid_client"),
        ({"grant_type": "password"}, basic("agent-analyst", "s3cret"), 400, "unsupported_grant_type"),
        ({"grant_type": "client_credentials", "scope": "chat:complete"},
         basic("agent-analyst", "s3cret"), 400, "invalid_scope"),
        ({"grant_type": "client_credentials", "resource": "http://other/mcp"},
         basic("agent-analyst", "s3cret"), 400, "invalid_target"),
    ],
)  # fmt: skip
def test_refusals_use_the_rfc_6749_error_bodies(client, form, headers, status, error):
    r = client.post("/oauth/token", data=form, headers=headers)
    assert r.status_code == status and r.json()["error"] == error
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Basic")


def test_authorization_server_metadata_names_the_token_endpoint(client):
    doc = client.get("/.well-known/oauth-authorization-server").json()
    assert doc["issuer"] == ORIGIN and doc["token_endpoint"] == ORIGIN + "/oauth/token"
    assert doc["grant_types_supported"] == ["client_credentials"]


def test_clients_are_validated_in_the_platform_config():
    mcp = {"resource_url": RESOURCE}
    with pytest.raises(ServingConfigError, match=r"mcp.clients.a.secret_hash"):
        parse_platform_config(
            {"mcp": {**mcp, "clients": {"a": {"secret_hash": "s3cret", "scopes": ["sql:query"]}}}}
        )
    with pytest.raises(ServingConfigError, match=r"mcp.clients.a.scopes"):
        parse_platform_config(
            {
                "mcp": {
                    **mcp,
                    "clients": {"a": {"secret_hash": hash_api_key("x"), "scopes": ["db:write"]}},
                }
            }
        )
    with pytest.raises(ServingConfigError, match="external issuer"):
        parse_platform_config(
            {
                "mcp": {
                    **mcp,
                    "jwks_url": "https://idp/jwks",
                    "clients": {"a": {"secret_hash": hash_api_key("x"), "scopes": ["sql:query"]}},
                }
            }
        )
