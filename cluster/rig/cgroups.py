"""CPU and memory limits with cgroup v1: one `cpu` and one `memory` group per node.

    /sys/fs/cgroup/cpu/expertmesh-rig/<node>/cpu.cfs_quota_us     speed-proportional quota
    /sys/fs/cgroup/memory/expertmesh-rig/<node>/memory.limit_in_bytes

A node's `ray start` runs in both groups before it execs, so its raylet and every worker the
raylet forks (shards included) inherit them; a driver joins the head's groups with `join`.
The groups' task lists are also how `down` finds every process the rig started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from .plan import CGROUP, NodePlan
from .state import RigState
from .system import CGROUP_ROOT

CONTROLLERS = tuple(
    c for c in ("cpu", "cpuacct", "memory") if c != "cpuacct" or (CGROUP_ROOT / c).is_dir()
)
"""cpuacct (where it is mounted apart from cpu) counts each node's CPU time for `status`."""


RIG_CPU_SHARES = 262144
"""cgroup v1's largest weight."""


def group_dir(controller: str, node: str) -> Path:
    return CGROUP_ROOT / controller / CGROUP / node


def create_node_groups(node: NodePlan, state: RigState) -> None:
    for controller in CONTROLLERS:
        parent = CGROUP_ROOT / controller / CGROUP
        state.record("cgroup", controller=controller, path=str(group_dir(controller, node.name)))
        parent.mkdir(exist_ok=True)
        group_dir(controller, node.name).mkdir(exist_ok=True)
        if controller == "cpu":
            # Priority over the rest of the machine, so each quota is what its node gets even
            # when the machine is busy (the quotas sum to less than the machine's cores).
            (parent / "cpu.shares").write_text(str(RIG_CPU_SHARES))
    (group_dir("memory", node.name) / "memory.limit_in_bytes").write_text(str(node.memory_bytes))


def apply_cpu_quota(node: NodePlan, limited: bool = True) -> None:
    """Set (or, limited=False, lift) the node's CPU quota. `up` lifts it while Ray starts:
    a raylet under a tenth of a core on a busy machine misses Ray's start-up deadline."""
    cpu = group_dir("cpu", node.name)
    (cpu / "cpu.cfs_period_us").write_text(str(node.cpu_period_us))
    (cpu / "cpu.cfs_quota_us").write_text(str(node.cpu_quota_us if limited else -1))


PROBE_GROUP = "probe"
"""A group without a quota, under the rig's priority weight, for link probes: they measure
the link, and must not be starved by the rest of a busy machine."""


def ensure_probe_group() -> str:
    """Create the probe group (cpu only); returns a shell prefix that enters it."""
    group = group_dir("cpu", PROBE_GROUP)
    group.parent.mkdir(exist_ok=True)
    group.mkdir(exist_ok=True)
    return f"echo $$ > {group / 'cgroup.procs'}"


def procs_files(node: str) -> list[Path]:
    return [group_dir(c, node) / "cgroup.procs" for c in CONTROLLERS]


def pids(node: str) -> set[int]:
    out: set[int] = set()
    for path in procs_files(node):
        with contextlib.suppress(FileNotFoundError):
            out |= {int(p) for p in path.read_text().split()}
    return out


def read_limits(node: str) -> dict[str, int]:
    cpu, mem = group_dir("cpu", node), group_dir("memory", node)
    usage = group_dir("cpuacct", node) / "cpuacct.usage"
    return {
        "cpu_quota_us": int((cpu / "cpu.cfs_quota_us").read_text()),
        "cpu_period_us": int((cpu / "cpu.cfs_period_us").read_text()),
        "memory_limit_bytes": int((mem / "memory.limit_in_bytes").read_text()),
        "memory_usage_bytes": int((mem / "memory.usage_in_bytes").read_text()),
        "cpu_usage_ns": int(usage.read_text()) if usage.exists() else -1,
    }


def enter_command(node: str) -> str:
    """Shell that moves itself into the node's groups (then `exec`s the rest)."""
    return "; ".join(f"echo $$ > {p}" for p in procs_files(node))


@contextlib.contextmanager
def joined(node: str) -> Iterator[None]:
    """Move this process into the node's groups for the block, and back out after."""
    pid = str(os.getpid())
    home = _own_groups()
    for path in procs_files(node):
        path.write_text(pid)
    try:
        yield
    finally:
        for controller in CONTROLLERS:
            with contextlib.suppress(OSError):
                back = CGROUP_ROOT / controller / home.get(controller, "/").lstrip("/")
                (back / "cgroup.procs").write_text(pid)


def _own_groups() -> dict[str, str]:
    """controller -> this process's group path (from /proc/self/cgroup)."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        for name in names.split(","):
            out[name] = path
    return out


def kill_all(node: str, grace_s: float = 3.0) -> int:
    """SIGTERM then SIGKILL every process in the node's groups (never this process)."""
    me = os.getpid()
    victims = pids(node) - {me}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            victims = pids(node) - {me}
            if not victims:
                return 0
            time.sleep(0.1)
    return len(pids(node) - {me})


def remove_group(path: Path) -> bool:
    """rmdir a group (after its processes are gone); False if it was not there."""
    for _ in range(50):
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return False
        except OSError:  # busy: a process is still exiting
            time.sleep(0.1)
    path.rmdir()
    return True


def leftover_groups() -> list[Path]:
    out = []
    for controller in CONTROLLERS:
        parent = CGROUP_ROOT / controller / CGROUP
        if parent.exists():
            out += [p for p in parent.iterdir() if p.is_dir()] + [parent]
    return out
