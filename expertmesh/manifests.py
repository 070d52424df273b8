"""KubeRay manifests from the topology YAML the cluster uses.

    expertmesh manifests render --topology examples/topologies/mixed.yaml \\
        --out manifests/overlays/prod-gpu --image registry.example.com/expertmesh:0.1.0

`manifests/base/` holds what does not depend on the topology: the RayService (serveConfigV2
naming `expertmesh.agents.app:build_app`), the RayCluster for ad-hoc work, the RayJob
templates, Redis for GCS fault tolerance, the PodDisruptionBudget, monitoring and the
OpenTelemetry Collector. Its Ray objects have a head and no workers. `render_overlay` writes a
kustomize overlay on top of it:

- `topology.yaml`: the topology, merged into the `expertmesh-config` ConfigMap that every Ray
  pod mounts at `/etc/expertmesh` (the serve config reads `/etc/expertmesh/topology.yaml`);
- `workers.yaml`: patches giving the RayService's and the RayCluster's Ray cluster the worker
  groups of the topology (`worker_groups`);
- `kustomization.yaml`: the base, those patches, any extra patches, and the image.

Worker groups. The expert shards pin themselves to a topology node with the custom Ray
resource `expertmesh_node_<name>` (`cluster.pool.node_resource`), which exactly one Ray node
must offer. KubeRay starts every replica of a worker group from the same template and
`rayStartParams`, and its pods are interchangeable (random names, any one removed on scale
down), so a group of N replicas cannot give each pod its own resource. Each topology node
therefore gets its own worker group with one replica; nodes of one *class* (same kind, speed,
memory and labels, `node_classes`) get identical templates apart from that resource, and carry
the class in the `expertmesh.io/node-class` pod label.

Per node: CPU and memory requests and limits from `memory_bytes` and `speed`, one GPU for a
gpu node, a nodeSelector and tolerations from the kind and the `rack`/`zone`/`region` labels,
and a preStop hook that drains the pod's Ray node (`drain_command`) so an eviction is a planned
drain, not a node loss.
Everything is plain dicts dumped with PyYAML; nothing here talks to a cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from expertmesh.cluster.pool import node_resource
from expertmesh.cluster.topology import Node, Topology

__all__ = [
    "BASE_DIR",
    "DEFAULT_IMAGE",
    "IMAGE_NAME",
    "RAY_CLUSTERS",
    "NodeClass",
    "node_classes",
    "render_overlay",
    "worker_group",
    "worker_groups",
]

BASE_DIR = Path(__file__).resolve().parent.parent / "manifests" / "base"
"""The kustomize base in this repository (the overlay refers to it by relative path)."""
IMAGE_NAME = "expertmesh"
"""The image name the base uses; the overlay's `images` entry points it at a registry."""
DEFAULT_IMAGE = "expertmesh:dev"
"""What `--image` defaults to: the image `docker build -f manifests/Dockerfile -t
expertmesh:dev .` makes, loadable into kind/minikube without a registry."""
TOPOLOGY_DIGEST_ANNOTATION = "expertmesh.io/topology-sha256"
NAMESPACE = "expertmesh"
"""The namespace of the base; the overlay puts its own resources there too."""
CONFIG_MOUNT = "/etc/expertmesh"
STATE_MOUNT = "/var/lib/expertmesh"
DRAIN_WAIT_S = 10
"""A terminating worker pod asks Ray to drain its node, then waits this long so every serving
replica's supervisor moves the node's experts off before the shard processes stop."""
TERMINATION_GRACE_S = 60
OVERHEAD_BYTES = 2 * 1024**3
"""Memory a Ray worker needs beyond the topology's `memory_gb` (Python, torch, Ray's object
store floor)."""
CPUS_PER_SPEED = 4
"""CPU cores requested per unit of `speed` on a cpu node (speed 1.0 = the reference node)."""
GPU_HOST_CPUS = 4
"""CPU cores requested next to the GPU of a gpu node."""
DEFAULT_SPEED = 1.0
"""Speed assumed for sizing a node whose speed is measured at start-up (`speed: measure`)."""

RAY_CLUSTERS: Mapping[tuple[str, str], tuple[str, ...]] = {
    ("RayService", "expertmesh"): ("spec", "rayClusterConfig"),
    ("RayCluster", "expertmesh-adhoc"): ("spec",),
}
"""Base objects whose Ray cluster gets the topology's worker groups: (kind, name) -> path of
the RayClusterSpec inside the object. The RayJob templates run on their own small clusters
(training needs no expert shards) and keep the base's workers."""

NODE_SELECTOR_KEYS: Mapping[str, str] = {
    "rack": "expertmesh.io/rack",
    "zone": "topology.kubernetes.io/zone",
    "region": "topology.kubernetes.io/region",
}
"""Topology label -> Kubernetes node label it selects on. Other labels select on
`expertmesh.io/<key>`."""

_LABEL_VALUE_UNSAFE = re.compile(r"[^a-z0-9.-]+")


@dataclass(frozen=True)
class NodeClass:
    """Topology nodes that get the same pod template (apart from their node resource)."""

    name: str
    """A Kubernetes label value naming the class, e.g. `cpu-x1-16gb-rack-r1`."""
    kind: str
    speed: float | None
    memory_bytes: int
    labels: tuple[tuple[str, str], ...]
    nodes: tuple[str, ...]


def _class_key(node: Node) -> tuple[str, float | None, int, tuple[tuple[str, str], ...]]:
    return (node.kind, node.speed, node.memory_bytes, tuple(sorted(node.labels.items())))


def _class_name(node: Node) -> str:
    speed = "measured" if node.speed is None else f"x{node.speed:g}"
    parts = [node.kind, speed, f"{node.memory_bytes / 1e9:g}gb"]
    parts += [f"{k}-{v}" for k, v in sorted(node.labels.items())]
    name = _LABEL_VALUE_UNSAFE.sub("-", "-".join(parts).lower()).strip("-.")
    return name[:63].rstrip("-.")


def node_classes(topology: Topology) -> list[NodeClass]:
    """The topology's nodes grouped by kind, speed, memory and labels, in topology order."""
    grouped: dict[tuple[Any, ...], list[Node]] = {}
    for node in topology.nodes:
        grouped.setdefault(_class_key(node), []).append(node)
    return [
        NodeClass(
            name=_class_name(nodes[0]),
            kind=nodes[0].kind,
            speed=nodes[0].speed,
            memory_bytes=nodes[0].memory_bytes,
            labels=tuple(sorted(nodes[0].labels.items())),
            nodes=tuple(n.name for n in nodes),
        )
        for nodes in grouped.values()
    ]


def _cpus(node: Node) -> int:
    if node.kind == "gpu":
        return GPU_HOST_CPUS
    return max(1, math.ceil(CPUS_PER_SPEED * (node.speed or DEFAULT_SPEED)))


def _memory_quantity(nbytes: int) -> str:
    return f"{math.ceil(nbytes / 1024**2)}Mi"


def _node_selector(node: Node) -> dict[str, str]:
    selector = {NODE_SELECTOR_KEYS.get(k, f"expertmesh.io/{k}"): v for k, v in node.labels.items()}
    if node.kind == "gpu":
        selector["nvidia.com/gpu.present"] = "true"
    return dict(sorted(selector.items()))


def _tolerations(node: Node) -> list[dict[str, str]]:
    """GPU nodes are usually tainted `nvidia.com/gpu`; racks may be dedicated with a taint
    `expertmesh.io/rack=<rack>:NoSchedule`."""
    tolerations = []
    if node.kind == "gpu":
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if node.rack is not None:
        tolerations.append(
            {
                "key": NODE_SELECTOR_KEYS["rack"],
                "operator": "Equal",
                "value": node.rack,
                "effect": "NoSchedule",
            }
        )
    return tolerations


def ray_start_resources(resources: Mapping[str, float]) -> str:
    """`rayStartParams.resources` as KubeRay wants it: KubeRay pastes the value into the
    `ray start --resources=...` shell command, so it is the JSON object inside double quotes
    with its own quotes backslash-escaped: `"{\\"Custom1\\": 1}"` (the format of KubeRay's
    docs, and what Ray's KubeRay autoscaler parses back)."""
    escaped = json.dumps(dict(resources)).replace('"', '\\"')
    return f'"{escaped}"'


def drain_command() -> list[str]:
    """The worker pods' preStop hook: an evicted or deleted pod announces itself to Ray as
    draining (`expertmesh cluster drain`), so no request waits on its shards while they stop.
    A failure never blocks the pod's termination."""
    return [
        "/bin/sh",
        "-c",
        f'expertmesh cluster drain "$EXPERTMESH_NODE" --address auto '
        f"--deadline-s {TERMINATION_GRACE_S} --wait-s {DRAIN_WAIT_S} "
        f'--message "pod $HOSTNAME terminating" || true',
    ]


def worker_group(node: Node, node_class: NodeClass, cluster: str) -> dict[str, Any]:
    """The worker group (one replica) that stands for topology node `node` in Ray cluster
    `cluster` (a value of the `expertmesh.io/cluster` label)."""
    cpus = _cpus(node)
    memory = _memory_quantity(node.memory_bytes + OVERHEAD_BYTES)
    limits: dict[str, str | int] = {"cpu": str(cpus), "memory": memory}
    ray_start: dict[str, str] = {
        "num-cpus": str(cpus),
        "resources": ray_start_resources({node_resource(node.name): 1}),
    }
    if node.kind == "gpu":
        limits["nvidia.com/gpu"] = 1
        ray_start["num-gpus"] = "1"
    pod_spec: dict[str, Any] = {
        "containers": [
            {
                "name": "ray-worker",
                "image": IMAGE_NAME,
                "env": [{"name": "EXPERTMESH_NODE", "value": node.name}],
                "resources": {"requests": dict(limits), "limits": dict(limits)},
                "lifecycle": {"preStop": {"exec": {"command": drain_command()}}},
                "volumeMounts": [
                    {"name": "expertmesh-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
                    {"name": "expertmesh-state", "mountPath": STATE_MOUNT},
                ],
            }
        ],
        "volumes": [
            {"name": "expertmesh-config", "configMap": {"name": "expertmesh-config"}},
            {"name": "expertmesh-state", "emptyDir": {}},
        ],
    }
    pod_spec["terminationGracePeriodSeconds"] = TERMINATION_GRACE_S
    selector = _node_selector(node)
    if selector:
        pod_spec["nodeSelector"] = selector
    tolerations = _tolerations(node)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return {
        "groupName": node.name,
        "replicas": 1,
        "minReplicas": 1,
        "maxReplicas": 1,
        "rayStartParams": ray_start,
        "template": {
            "metadata": {
                "labels": {
                    "app.kubernetes.io/name": "expertmesh",
                    "app.kubernetes.io/component": "ray-worker",
                    "expertmesh.io/cluster": cluster,
                    "expertmesh.io/node": node.name,
                    "expertmesh.io/node-class": node_class.name,
                }
            },
            "spec": pod_spec,
        },
    }


def worker_groups(topology: Topology, cluster: str) -> list[dict[str, Any]]:
    """One worker group per topology node, class by class (see the module docstring)."""
    groups = []
    for node_class in node_classes(topology):
        for name in node_class.nodes:
            groups.append(worker_group(topology.node(name), node_class, cluster))
    return groups


def _nest(path: Sequence[str], leaf: dict[str, Any]) -> dict[str, Any]:
    for key in reversed(path):
        leaf = {key: leaf}
    return leaf


def worker_patches(topology: Topology, topology_text: str) -> list[dict[str, Any]]:
    """Strategic-merge patches replacing the worker groups of each object in `RAY_CLUSTERS`
    (lists in custom resources are replaced whole by kustomize). The head pod template gets
    the topology's digest as an annotation: the replica reads the topology only at start, and
    a changed template makes KubeRay roll the RayService to a new cluster (zero downtime) even
    when only links changed."""
    digest = hashlib.sha256(topology_text.encode()).hexdigest()
    head = {"template": {"metadata": {"annotations": {TOPOLOGY_DIGEST_ANNOTATION: digest}}}}
    patches = []
    for (kind, name), path in RAY_CLUSTERS.items():
        cluster = "serve" if kind == "RayService" else "adhoc"
        api = {"apiVersion": "ray.io/v1", "kind": kind, "metadata": {"name": name}}
        spec = {"headGroupSpec": head, "workerGroupSpecs": worker_groups(topology, cluster)}
        patches.append({**api, **_nest(path, spec)})
    return patches


def _dump_all(docs: Sequence[Mapping[str, Any]]) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False, default_flow_style=False)


def _split_image(image: str) -> dict[str, str]:
    """`registry/name:tag` or `name@sha256:...` -> a kustomize `images` entry for IMAGE_NAME."""
    entry = {"name": IMAGE_NAME}
    if "@" in image:
        entry["newName"], entry["digest"] = image.split("@", 1)
        return entry
    name, sep, tag = image.rpartition(":")
    if sep and "/" not in tag:
        entry["newName"], entry["newTag"] = name, tag
    else:
        entry["newName"] = image
    return entry


def render_overlay(
    topology: Topology,
    topology_text: str,
    out: Path,
    image: str = DEFAULT_IMAGE,
    base: Path = BASE_DIR,
    extra_patches: Sequence[str] = (),
    extra_resources: Sequence[str] = (),
) -> list[Path]:
    """Write the overlay for `topology` into `out` (created if needed); return the files
    written. `topology_text` is the topology YAML as the user wrote it (comments kept);
    `extra_patches` and `extra_resources` are files already in `out` (kept as they are) to
    list in the kustomization after the worker patches and the base."""
    out.mkdir(parents=True, exist_ok=True)
    for extra in (*extra_patches, *extra_resources):
        if not (out / extra).is_file():
            raise FileNotFoundError(f"{extra!r} is not a file in {out}")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": NAMESPACE,
        "resources": [os.path.relpath(base.resolve(), out.resolve()), *extra_resources],
        "configMapGenerator": [
            {
                "name": "expertmesh-config",
                "behavior": "merge",
                "files": ["topology.yaml"],
                # The Ray objects name the ConfigMap; kustomize does not rewrite names in
                # custom resources, so the name must not get a hash suffix.
                "options": {"disableNameSuffixHash": True},
            }
        ],
        "patches": [{"path": "workers.yaml"}, *({"path": p} for p in extra_patches)],
        "images": [_split_image(image)],
    }
    header = (
        f"# Generated by `expertmesh manifests render` for topology {topology.name!r}: edit the\n"
        "# topology and render again instead of editing this file.\n"
    )
    files = {
        "kustomization.yaml": header + yaml.safe_dump(kustomization, sort_keys=False),
        "workers.yaml": header + _dump_all(worker_patches(topology, topology_text)),
        "topology.yaml": topology_text,
    }
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written
