"""`expertmesh sql` (in this process with --local; against a server in tests/serving's e2e
test) and `expertmesh mcp token`."""

from __future__ import annotations

import json

import jwt
import pytest

from expertmesh.agents.agent_auth import JwtVerifier, TokenIssuer
from expertmesh.cli import main


@pytest.fixture(autouse=True)
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTMESH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EXPERTMESH_API_KEY", raising=False)


def test_sql_local_answers_over_the_sample_database_with_the_demo_model(capsys):
    assert main(["sql", "--local", "--json", "How many characters are in Hamlet?"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["model"] == "expertmesh-demo"
    assert answer["rows"] == [[7]]  # the fine-tuned demo model's SQL, run read-only
    assert answer["linked_tables"] == ["characters", "plays"]


def test_sql_local_prints_sql_rows_and_explanation(capsys):
    assert main(["sql", "--local", "What genre is Macbeth?"]) == 0
    out = capsys.readouterr().out
    assert "SELECT genre FROM plays" in out and "tragedy" in out and "Read plays" in out


def test_sql_without_a_running_platform_says_what_to_do(capsys):
    assert main(["sql", "How many plays are there?"]) == 2
    assert "no running `expertmesh up`" in capsys.readouterr().err


def test_sql_names_an_unreachable_postgresql_server_without_a_traceback(capsys):
    db = "postgresql://nobody:pw-not-shown@127.0.0.1:1/none"
    assert main(["sql", "--local", "--db", db, "How many plays?"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect to PostgreSQL at postgresql://nobody@127.0.0.1:1/none" in err
    assert "Traceback" not in err and "pw-not-shown" not in err


def test_mcp_token_is_signed_for_the_resource_with_the_scopes(tmp_path, capsys):
    key, resource = tmp_path / "issuer.pem", "http://127.0.0.1:9/mcp"
    argv = ["mcp", "token", "--agent", "agent-analyst", "--scope", "sql:query"]
    assert main([*argv, "--resource", resource, "--key-file", str(key)]) == 0
    token = capsys.readouterr().out.strip()
    verifier = JwtVerifier("http://127.0.0.1:9", resource, keys=TokenIssuer.from_key_file(
        "http://127.0.0.1:9", key).public_keys)  # fmt: skip
    claims = verifier.decode(token)
    assert claims["client_id"] == "agent-analyst" and claims["scope"] == "sql:query"
    with pytest.raises(jwt.InvalidAudienceError):
        JwtVerifier(verifier.issuer, "http://other/mcp", keys=verifier._keys).decode(token)


@pytest.mark.parametrize("scopes", [[], ["--scope", "db:write"]])
def test_mcp_token_refuses_unknown_or_missing_scopes(tmp_path, capsys, scopes):
    argv = ["mcp", "token", "--agent", "a", *scopes]
    assert main([*argv, "--resource", "http://h:1/mcp", "--key-file", str(tmp_path / "k")]) == 2
    assert "--scope: give one or more of" in capsys.readouterr().err


def test_mcp_token_without_a_running_platform_says_what_to_do(capsys):
    assert main(["mcp", "token", "--agent", "a", "--scope", "sql:query"]) == 2
    assert "no running `expertmesh up`" in capsys.readouterr().err


def test_sql_against_something_that_is_not_expertmesh_says_so(capsys):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotUs(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(502)
            self.end_headers()
            self.wfile.write(b"<html>Bad Gateway</html>")

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotUs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert main(["sql", "--url", url, "How many plays?"]) == 2
    finally:
        server.shutdown()
    assert "refused (HTTP 502): <html>Bad Gateway" in capsys.readouterr().err
