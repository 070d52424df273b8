"""The vendored KubeRay CRDs (manifests/crds/kuberay/) are the files their README names, and the
validator built from them rejects what the apiserver would."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

CRD_DIR = Path(__file__).resolve().parents[2] / "manifests" / "crds" / "kuberay"
CRD_FILES = {"ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"}
ErrorsOf = Callable[[dict[str, Any]], list[str]]


def _readme_digests() -> dict[str, str]:
    table = re.findall(
        r"^\| (ray\.io_\w+\.yaml) \| ([0-9a-f]{64}) \|$", (CRD_DIR / "README.md").read_text(), re.M
    )
    return dict(table)


def test_every_kind_has_a_vendored_crd_with_its_digest_in_the_readme() -> None:
    digests = _readme_digests()
    assert set(digests) == CRD_FILES
    for name, digest in digests.items():
        actual = hashlib.sha256((CRD_DIR / name).read_bytes()).hexdigest()
        assert actual == digest, f"{name} differs from the copy its README names"


def test_vendored_crds_carry_their_licence() -> None:
    assert "Apache License" in (CRD_DIR / "LICENSE").read_text()
    assert "Apache License 2.0" in (CRD_DIR / "README.md").read_text()


def _raycluster(**head: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "t"},
        "spec": {
            "headGroupSpec": {
                "rayStartParams": {},
                "template": {"spec": {"containers": [{"name": "ray-head", "image": "ray"}]}},
                **head,
            }
        },
    }


def test_schema_accepts_a_minimal_raycluster(errors_of: ErrorsOf) -> None:
    assert errors_of(_raycluster()) == []


def test_schema_rejects_a_misspelt_field(errors_of: ErrorsOf) -> None:
    errors = errors_of(_raycluster(serviceTyp="ClusterIP"))
    assert any("serviceTyp" in e for e in errors), errors
