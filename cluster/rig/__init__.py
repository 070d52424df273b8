"""A real multi-host cluster on one machine (`expertmesh rig up|status|down`).

One Ray node per topology node, each in its own network namespace on a Linux bridge (`netns`),
its traffic rate-limited per peer by tc htb (`links`), its raylet and workers in cgroups whose
CPU quota is proportional to the node's speed and whose memory limit follows `memory_gb`
(`cgroups`); Ray itself in `nodes`; calibration (GEMM per node, bandwidth and round trip per
link, the fixed cost of a dispatch call) in `calibrate`; what was made, for `down`, in `state`.
`rig` puts them together. The plan (`plan`) is pure and says how the machine was scaled.
"""
