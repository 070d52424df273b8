"""`examples/agents/two_agents.py` as a user runs it: an in-process MCP server on the demo
model, one agent answered and one refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "agents" / "two_agents.py"


def test_the_analyst_gets_rows_and_the_chat_agent_gets_insufficient_scope():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    analyst, chat = r.stdout.split("agent-chat:", 1)
    assert "agent-analyst: allowed" in analyst and "'Macbeth'" in analyst
    assert "Lady Macbeth" in analyst  # the rows of the demo model's SQL
    assert chat.startswith(" refused, HTTP 403")
    assert 'error="insufficient_scope"' in chat and 'scope="sql:query"' in chat
