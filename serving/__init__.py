"""OpenAI-compatible serving on Ray Serve: the API routes (`api`, `protocol`), the Ray Serve
application and its route-mount hook (`app`), the engine protocol (`engine`) and its engines
(`local_engine`: ours with continuous batching in `scheduler`; `vllm_engine`; `remote_engine`),
the selector gate in front of them (`gate`), engine metrics (`engine_metrics`) and the serving
config (`config`). Depends on `cluster`, `models`, `routing`, `policies` and `observability`;
agent routes (`expertmesh.agents`) come in through the hook, never by import."""
