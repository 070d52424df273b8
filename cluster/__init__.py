"""Expert-parallel cluster: topology, placement, expert shards as Ray actors, dispatch (not built yet)."""
