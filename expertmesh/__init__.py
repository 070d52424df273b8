"""expertmesh: serve and train Mixture-of-Experts models on heterogeneous Ray clusters.

This package holds only the command line (`expertmesh.cli`) and the root configuration;
the subsystems live in sibling packages installed under this namespace:
`expertmesh.models`, `expertmesh.cluster`, `expertmesh.serving`, `expertmesh.routing`,
`expertmesh.policies`, `expertmesh.training`, `expertmesh.observability`, `expertmesh.agents`,
`expertmesh.chaos` (docs/architecture.md has the map). The CLI is the one place that wires
them together; `demo/` is the bundled demo checkpoint (found through `models.paths`).
"""

__version__ = "0.1.0"
