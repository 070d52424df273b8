"""Training and compression on Ray Train: job configs (`config`), the model a job starts from
(`model_init`), data and corpora (`data`, `corpus`, `example_data`, `tokenizer`), the shared
loop and runner (`loop`, `runner`, `entry`), the jobs (`pretrain`, `sft`, `dpo`, `distill`),
compression (`quantize`, `prune`, `compression`), expert-load balance (`balance`), evaluation
(`evaluation`) and the demo pipeline (`demo`). Writes Hugging Face checkpoints through
`expertmesh.models`; imports no serving or cluster code."""
