"""Agent access to the platform: the MCP server (`mcp_server`), OAuth 2.1 resource-server checks
(`agent_auth`) and the built-in token endpoint (`oauth_token`), text-to-SQL (`sql`: prompt,
model call and repair; `sql_guard`: the query guard and the read-only SQLite runner;
`sql_postgres`: the PostgreSQL runner; `sql_open`: a database from a path or URL; `sql_demo`:
the sample database; `sql_api`: the `/v1/sql/answer` route), their configuration (`config`)
and the mount that adds them to an API replica (`app`). Uses `expertmesh.serving`'s engine
protocol and route-mount hook and `expertmesh.routing`'s selector; `serving` never imports this
package."""
