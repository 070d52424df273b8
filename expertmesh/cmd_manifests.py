"""`expertmesh manifests render`: a kustomize overlay of `manifests/base` for a topology.

    expertmesh manifests render --topology examples/topologies/mixed.yaml --out my-overlay \\
        --image registry.example.com/expertmesh:0.1.0
    kubectl apply -k my-overlay
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .manifests import BASE_DIR, DEFAULT_IMAGE, node_classes, render_overlay


def add_manifests(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("manifests", help="Kubernetes (KubeRay) manifests for a topology")
    msub = p.add_subparsers(dest="manifests_command", required=True, metavar="ACTION")
    render = msub.add_parser(
        "render",
        help="write a kustomize overlay: worker groups, topology ConfigMap, image",
        description="Write a kustomize overlay of manifests/base whose Ray clusters have one "
        "worker group per topology node (grouped by node class), then `kubectl apply -k OUT`.",
    )
    render.add_argument(
        "--topology", required=True, type=Path, help="topology YAML (examples/topologies/)"
    )
    render.add_argument(
        "--out", type=Path, default=Path("expertmesh-overlay"), help="overlay directory"
    )
    render.add_argument(
        "--image", default=DEFAULT_IMAGE, help=f"container image (default {DEFAULT_IMAGE})"
    )
    render.add_argument(
        "--base", type=Path, default=BASE_DIR, help="kustomize base (default manifests/base)"
    )
    render.add_argument(
        "--patch",
        action="append",
        default=[],
        metavar="FILE",
        help="an extra patch file in OUT to list in the kustomization (repeatable)",
    )
    render.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="FILE",
        help="an extra resource file in OUT to list in the kustomization (repeatable)",
    )
    render.set_defaults(func=run_render)


def run_render(args: argparse.Namespace) -> int:
    from expertmesh.cluster.topology import load_topology

    topology = load_topology(args.topology)
    written = render_overlay(
        topology,
        args.topology.read_text(),
        args.out,
        image=args.image,
        base=args.base,
        extra_patches=args.patch,
        extra_resources=args.resource,
    )
    for node_class in node_classes(topology):
        print(f"class {node_class.name}: {', '.join(node_class.nodes)}")
    for path in written:
        print(f"wrote {path}")
    print(f"apply with: kubectl apply -k {args.out}")
    return 0
