"""Offline validation of the Kubernetes manifests: a small kustomize resolver (only the
features `manifests/` uses), the KubeRay CRD schemas vendored in `manifests/crds/kuberay/`, and
the core Kubernetes schemas that the `kubernetes-validate` wheel ships. Where kubectl is
installed, a test checks the resolver builds exactly what `kubectl kustomize` builds."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "manifests" / "crds" / "kuberay"
"""Vendored KubeRay CRDs (source, version, licence and digests in its README.md)."""
KUBERNETES_VERSION = "1.33.0"
"""The Kubernetes version whose schemas the core resources are checked against."""

KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
"""CRDs without a schema here: checked by the tests field by field instead."""
CLUSTER_SCOPED_KINDS = {"Namespace"}

_KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "patches",
    "images",
}


class KustomizeError(AssertionError):
    """The kustomization uses something the resolver does not implement, or is wrong."""


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge_patch(target: Any, patch: Any, where: str = "") -> Any:
    """RFC 7386 JSON merge patch. Kustomize has no schema for custom resources and merges some
    of their lists by guessed keys (`name`...), so a patch here may set a list only where the
    base has none or an empty one: then every merge strategy gives the same result."""
    if isinstance(patch, list) and target:
        raise KustomizeError(f"patch sets the non-empty list {where}: merge would be ambiguous")
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value, f"{where}.{key}")
    return result


def _walk_containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container of `node` at any depth, as kustomize's image transformer finds them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            yield from _walk_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_containers(item)


def _set_image(container: dict[str, Any], entry: dict[str, str]) -> None:
    image = container.get("image", "")
    name = image.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    if name != entry["name"]:
        return
    new = entry.get("newName", name)
    if "digest" in entry:
        container["image"] = f"{new}@{entry['digest']}"
    elif "newTag" in entry:
        container["image"] = f"{new}:{entry['newTag']}"
    else:
        container["image"] = new


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build DIRECTORY` for the subset of kustomize that `manifests/` uses."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{directory}: resolver does not implement {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects += kustomize_build(path) if path.is_dir() else _load_docs(path)

    hashless = kustomization.get("generatorOptions", {}).get("disableNameSuffixHash", False)
    for gen in kustomization.get("configMapGenerator", []):
        options = {**kustomization.get("generatorOptions", {}), **gen.get("options", {})}
        if not (hashless or options.get("disableNameSuffixHash")):
            raise KustomizeError(f"ConfigMap {gen['name']}: a name hash would break CR refs")
        data = {Path(f).name: (directory / f).read_text() for f in gen.get("files", [])}
        behavior = gen.get("behavior", "create")
        existing = [
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]
        ]
        if behavior == "merge":
            if len(existing) != 1:
                raise KustomizeError(f"merge into ConfigMap {gen['name']}: not in the base")
            existing[0]["data"] = {**existing[0].get("data", {}), **data}
        elif behavior == "create":
            if existing:
                raise KustomizeError(f"ConfigMap {gen['name']} already exists")
            objects.append(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": gen["name"]},
                    "data": data,
                }
            )
        else:
            raise KustomizeError(f"configMapGenerator behavior {behavior!r} not implemented")

    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise KustomizeError(f"patch {entry}: only `path` patches are implemented")
        for patch in _load_docs(directory / entry["path"]):
            matches = [
                i
                for i, o in enumerate(objects)
                if o["kind"] == patch["kind"]
                and o["metadata"]["name"] == patch["metadata"]["name"]
                and o["apiVersion"].split("/")[0] == patch["apiVersion"].split("/")[0]
            ]
            if len(matches) != 1:
                raise KustomizeError(
                    f"patch {entry['path']}: no single target for {patch['kind']}/{patch['metadata']['name']}"
                )
            objects[matches[0]] = _merge_patch(objects[matches[0]], patch)

    for entry in kustomization.get("images", []):
        for obj in objects:
            for container in _walk_containers(obj):
                _set_image(container, entry)

    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] in CLUSTER_SCOPED_KINDS:
                if obj["kind"] == "Namespace":
                    obj["metadata"]["name"] = namespace
            else:
                obj["metadata"]["namespace"] = namespace
    return objects


# ---------------------------------------------------------------------------------------------
# KubeRay CRD schemas (source and validator notes in manifests/crds/kuberay/README.md)
# ---------------------------------------------------------------------------------------------


def _tighten(schema: Any) -> None:
    """In place: drop `required` entries that have a default (the apiserver fills them, but
    jsonschema does not apply defaults), and forbid unknown fields in every object that lists
    its properties (the apiserver prunes them silently, so a typo would otherwise pass)."""
    if isinstance(schema, list):
        for item in schema:
            _tighten(item)
        return
    if not isinstance(schema, dict):
        return
    props = schema.get("properties")
    if isinstance(props, dict):
        if "required" in schema:
            schema["required"] = [
                r for r in schema["required"] if "default" not in props.get(r, {})
            ]
            if not schema["required"]:
                del schema["required"]
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
    for value in schema.values():
        _tighten(value)


@functools.cache
def kuberay_validator(kind: str) -> jsonschema.Draft7Validator:
    path = CRD_DIR / f"ray.io_{KUBERAY_KINDS[kind]}.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    _tighten(schema)
    # apiVersion/kind/metadata are checked by the apiserver, not the CRD schema.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(schema)


def _drop_nulls(node: Any) -> Any:
    """What the apiserver does before validating: null fields are absent."""
    if isinstance(node, dict):
        return {k: _drop_nulls(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_drop_nulls(v) for v in node]
    return node


def validation_errors(obj: dict[str, Any]) -> list[str]:
    """Problems of one manifest object: KubeRay kinds against the CRD schema, core kinds with
    kubernetes-validate (strict: unknown fields are errors), `[]` when it is valid."""
    import kubernetes_validate

    kind = obj.get("kind")
    where = f"{kind}/{obj.get('metadata', {}).get('name')}"
    if kind in KUBERAY_KINDS:
        if obj.get("apiVersion") != "ray.io/v1":
            return [f"{where}: apiVersion must be ray.io/v1"]
        validator = kuberay_validator(kind)
        return [
            f"{where}: {'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(_drop_nulls(obj))
        ]
    if kind in PROMETHEUS_OPERATOR_KINDS:
        return (
            [] if obj.get("apiVersion") == "monitoring.coreos.com/v1" else [f"{where}: apiVersion"]
        )
    try:
        kubernetes_validate.validate(_drop_nulls(obj), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(str(p) for p in e.path)}: {e.message}"]
    return []


@pytest.fixture(scope="session")
def build() -> Callable[[Path], list[dict[str, Any]]]:
    return kustomize_build


@pytest.fixture(scope="session")
def errors_of() -> Callable[[dict[str, Any]], list[str]]:
    return validation_errors
