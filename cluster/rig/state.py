"""The rig's state file: every resource is recorded *before* it is created.

`rig up` appends an entry (bridge, namespace, veth, qdisc, cgroup, Ray node) and writes the file
(atomically, fsynced) before it runs the command that makes it; `rig down` removes the entries
in reverse order, each removal tolerating a resource that was never made. So a crash at any
point of `up` leaves a state file that `down` can clean completely. The file lives in
`/run/expertmesh-rig/` (tmpfs, like namespaces and cgroups it does not outlive a reboot);
`$EXPERTMESH_RIG_STATE` overrides the path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def state_path() -> Path:
    return Path(os.environ.get("EXPERTMESH_RIG_STATE", "/run/expertmesh-rig/state.json"))


@dataclass
class RigState:
    """What `up` made (or was about to make), and what calibration measured."""

    path: Path
    phase: str = "starting"
    """starting -> up (every node joined, calibrated) -> stopping."""
    topology_file: str | None = None
    plan: dict[str, Any] | None = None
    resources: list[dict[str, Any]] = field(default_factory=list)
    ray_address: str | None = None
    temp_dir: str | None = None
    ray_node_ids: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    measured_topology: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: Path | None = None) -> RigState | None:
        path = path or state_path()
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return cls(path=path, **data)

    def record(self, kind: str, **details: Any) -> None:
        """Note a resource about to be created, and save, before creating it."""
        self.resources.append({"kind": kind, **details})
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in self.__dict__.items() if k != "path"}
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
