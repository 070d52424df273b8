"""Expert-parallel cluster: topology (`topology`), placement planning (`placement`, `eplb`,
`planning`), expert shards as Ray actors (`shard`, `pool`), token dispatch with failover
(`dispatch`), the embedded multi-node Ray cluster (`local`), the distributed model
(`runtime`) and live rebalancing (`rebalance`). Depends on `expertmesh.models` only."""
