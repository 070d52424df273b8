"""The single-process MoE model core: configs of the supported families read from Hugging
Face `config.json` (`config`, `adapters/`), the decoder maths (`model`: attention incl. MLA,
routers, experts), checkpoints in safetensors (`checkpoint`), where checkpoints are found
(`paths`: the bundled demo), the KV cache and its compressed modes (`kv_cache`), the tokenizer
(`tokenizer`), generation (`generate`), evaluation (`evaluate`) and router statistics
(`router_stats`). Imports only `expertmesh.observability`; every other package builds on it."""
