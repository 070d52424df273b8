"""Running the system commands the rig is made of (`ip`, `tc`), and what this machine lacks.

Every command's failure is a RigError quoting the command and its stderr. `check_support`
names each missing feature (root, `ip`, `tc`, network namespaces, veth, bridge, htb, cgroup v1
`cpu` and `memory` controllers) at once, before anything is created.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path

CLONE_NEWNET = 0x40000000
CGROUP_ROOT = Path(os.environ.get("EXPERTMESH_CGROUP_ROOT", "/sys/fs/cgroup"))


class RigError(RuntimeError):
    """A rig operation failed; the message names the command or the missing feature."""


class RigUnsupported(RigError):
    """This machine cannot run the rig; `missing` lists what it lacks."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__(
            "the rig cannot run here: " + "; ".join(self.missing) + ". Without it, use the "
            "embedded cluster (`expertmesh cluster up` without --rig), which emulates node "
            "speed and links by sleeping"
        )


HOME_NETNS: list[int] = []
"""File descriptors of the namespaces `netns.entered` left, outermost first: commands run
there (the bridge and the host-side veths live in the namespace the rig was made from, not in
the head's, where a driver's threads are)."""


def setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise RigError(f"setns failed: {os.strerror(ctypes.get_errno())}")


def run(
    argv: Sequence[str], check: bool = True, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run a command in the namespace the rig was made from (even from inside a driver)."""
    if HOME_NETNS:
        with open("/proc/thread-self/ns/net") as here:
            setns(HOME_NETNS[0])
            try:
                done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
            finally:
                setns(here.fileno())
    else:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s)
    if check and done.returncode != 0:
        raise RigError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def quiet(argv: Sequence[str]) -> bool:
    """Run a removal; True if it did something, False if there was nothing to remove."""
    return run(argv, check=False).returncode == 0


def in_netns(namespace: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", namespace, *argv]


def check_support() -> None:
    """RigUnsupported naming every missing feature; returns when all are there."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, tc and cgroups need it; run as root)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            missing.append(f"the `{tool}` command (install iproute2)")
    for controller, knob in (("cpu", "cpu.cfs_quota_us"), ("memory", "memory.limit_in_bytes")):
        if not (CGROUP_ROOT / controller / knob).exists():
            missing.append(
                f"the cgroup v1 `{controller}` controller ({CGROUP_ROOT / controller / knob} "
                "does not exist)"
            )
    if missing:
        raise RigUnsupported(missing)
    probe = f"emrigchk{uuid.uuid4().hex[:4]}"
    try:
        if not quiet(["ip", "netns", "add", probe]):
            missing.append("network namespaces (`ip netns add` fails)")
        if not quiet(["ip", "link", "add", probe + "b", "type", "bridge"]):
            missing.append("Linux bridges (`ip link add type bridge` fails)")
        if not quiet(
            ["ip", "link", "add", probe + "v", "type", "veth", "peer", "name", probe + "p"]
        ):
            missing.append("veth pairs (`ip link add type veth` fails)")
        elif not quiet(["tc", "qdisc", "add", "dev", probe + "v", "root", "handle", "1:", "htb"]):
            missing.append(
                "the htb qdisc (`tc qdisc add ... htb` fails: sch_htb not in the kernel)"
            )
    finally:
        quiet(["ip", "link", "del", probe + "v"])
        quiet(["ip", "link", "del", probe + "b"])
        quiet(["ip", "netns", "del", probe])
    if missing:
        raise RigUnsupported(missing)
