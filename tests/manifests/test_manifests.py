"""`manifests/` and `expertmesh manifests render`: every object of every overlay validates
(KubeRay CRD schemas, core Kubernetes schemas), worker groups follow the topology, alerts use
metric names the code emits."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from expertmesh.agents.config import parse_platform_config
from expertmesh.cli import build_parser, main
from expertmesh.cluster.pool import node_resource
from expertmesh.cluster.topology import load_topology, parse_topology
from expertmesh.manifests import node_classes, render_overlay

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "manifests" / "base"
OVERLAYS = {
    "dev-cpu": {"resources": ["secrets.yaml"], "patches": [], "image": "expertmesh:dev"},
    "prod-gpu": {
        "resources": [],
        "patches": ["prod.patch.yaml"],
        "image": "registry.example.com/expertmesh:0.1.0",
    },
}
EXAMPLE_TOPOLOGIES = sorted((REPO / "examples" / "topologies").glob("*.yaml"))
TRAINING_JOBS = ("pretrain", "sft", "dpo", "distill", "quantize", "prune")


def render_example(tmp_path: Path, topology: Path) -> Path:
    out = tmp_path / topology.stem
    render_overlay(load_topology(topology), topology.read_text(), out, base=BASE)
    return out


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def ray_cluster_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    specs = {}
    for o in objects:
        if o["kind"] == "RayService":
            specs[f"RayService/{o['metadata']['name']}"] = o["spec"]["rayClusterConfig"]
        elif o["kind"] == "RayCluster":
            specs[f"RayCluster/{o['metadata']['name']}"] = o["spec"]
        elif o["kind"] == "RayJob":
            specs[f"RayJob/{o['metadata']['name']}"] = o["spec"]["rayClusterSpec"]
    return specs


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_object_of_a_checked_in_overlay_validates(overlay, build, errors_of):
    objects = build(REPO / "manifests" / "overlays" / overlay)
    kinds = {o["kind"] for o in objects}
    assert {"RayService", "RayCluster", "RayJob", "ConfigMap", "PodDisruptionBudget"} <= kinds
    problems = [p for o in objects for p in errors_of(o)]
    assert problems == []


@pytest.mark.parametrize("topology", EXAMPLE_TOPOLOGIES, ids=lambda p: p.stem)
def test_every_object_rendered_for_an_example_topology_validates(
    topology, tmp_path, build, errors_of
):
    objects = build(render_example(tmp_path, topology))
    problems = [p for o in objects for p in errors_of(o)]
    assert problems == []


def test_a_typo_in_a_ray_object_fails_validation(build, errors_of):
    """The CRD schemas are tightened (additionalProperties: false), so a misspelt field is an
    error instead of silently pruned by the apiserver."""
    (service,) = find(build(REPO / "manifests" / "overlays" / "dev-cpu"), "RayService")
    group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")
    assert any("rayStartParam" in p for p in errors_of(service))


def test_a_worker_group_without_its_template_fails_validation(build, errors_of):
    (cluster,) = find(build(REPO / "manifests" / "overlays" / "dev-cpu"), "RayCluster")
    del cluster["spec"]["workerGroupSpecs"][0]["template"]
    assert any("template" in p for p in errors_of(cluster))


def test_a_typo_in_a_core_resource_fails_validation(build, errors_of):
    (pdb,) = find(build(REPO / "manifests" / "overlays" / "dev-cpu"), "PodDisruptionBudget")
    pdb["spec"]["maxUnavailible"] = pdb["spec"].pop("maxUnavailable")
    assert errors_of(pdb) != []


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_checked_in_overlay_is_what_render_writes(overlay, tmp_path):
    """The overlays are generated: rendering again changes nothing but the base's path."""
    here = REPO / "manifests" / "overlays" / overlay
    out = tmp_path / overlay
    out.mkdir()
    for extra in (*OVERLAYS[overlay]["resources"], *OVERLAYS[overlay]["patches"]):
        shutil.copy(here / extra, out / extra)
    render_overlay(
        load_topology(here / "topology.yaml"),
        (here / "topology.yaml").read_text(),
        out,
        image=OVERLAYS[overlay]["image"],
        base=BASE,
        extra_patches=OVERLAYS[overlay]["patches"],
        extra_resources=OVERLAYS[overlay]["resources"],
    )
    assert (out / "workers.yaml").read_text() == (here / "workers.yaml").read_text()
    fresh = yaml.safe_load((out / "kustomization.yaml").read_text())
    checked_in = yaml.safe_load((here / "kustomization.yaml").read_text())
    assert fresh["resources"][1:] == checked_in["resources"][1:]
    assert (here / checked_in["resources"][0]).resolve() == BASE.resolve()
    assert {**fresh, "resources": None} == {**checked_in, "resources": None}


# ---------------------------------------------------------------------------- worker groups


def test_each_topology_node_gets_one_worker_group_offering_its_node_resource(tmp_path, build):
    """Parsed by Ray's own KubeRay autoscaler code: `rayStartParams.resources` must be the
    quoted, backslash-escaped JSON that KubeRay pastes into `ray start --resources=`."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_custom_resources

    topology = load_topology(REPO / "examples" / "topologies" / "mixed.yaml")
    objects = build(render_example(tmp_path, REPO / "examples" / "topologies" / "mixed.yaml"))
    for name in ("RayService/expertmesh", "RayCluster/expertmesh-adhoc"):
        groups = ray_cluster_specs(objects)[name]["workerGroupSpecs"]
        assert [g["groupName"] for g in groups] == [n.name for n in topology.nodes]
        for group, node in zip(groups, topology.nodes, strict=True):
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
            resources = _get_custom_resources({}, group["rayStartParams"], group["groupName"])
            assert resources == {node_resource(node.name): 1}


def test_gpu_node_requests_a_gpu_and_tolerates_the_gpu_taint(tmp_path, build):
    objects = build(render_example(tmp_path, REPO / "examples" / "topologies" / "mixed.yaml"))
    groups = {
        g["groupName"]: g
        for g in find(objects, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    }
    gpu = groups["gpu-0"]
    pod = gpu["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert (
        "nvidia.com/gpu"
        not in groups["cpu-fast"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )


def test_memory_request_covers_the_node_memory_and_speed_sets_cpus(tmp_path, build):
    def mebibytes(q: str) -> int:
        assert q.endswith("Mi")
        return int(q[:-2]) * 1024**2

    topology = load_topology(REPO / "examples" / "topologies" / "mixed.yaml")
    objects = build(render_example(tmp_path, REPO / "examples" / "topologies" / "mixed.yaml"))
    groups = {g["groupName"]: g for g in find(objects, "RayCluster")[0]["spec"]["workerGroupSpecs"]}
    for node in topology.nodes:
        resources = groups[node.name]["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"]
        assert mebibytes(resources["requests"]["memory"]) >= node.memory_bytes
    cpus = {n: int(groups[n]["rayStartParams"]["num-cpus"]) for n in ("cpu-fast", "cpu-slow")}
    assert cpus["cpu-fast"] > cpus["cpu-slow"] >= 1


def test_rack_labels_become_node_selectors_and_tolerations(tmp_path, build):
    objects = build(render_example(tmp_path, REPO / "examples" / "topologies" / "two-racks.yaml"))
    groups = find(objects, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for group in groups:
        rack = group["groupName"].split("-")[0]
        pod = group["template"]["spec"]
        assert pod["nodeSelector"] == {"expertmesh.io/rack": rack}
        assert {
            "key": "expertmesh.io/rack",
            "operator": "Equal",
            "value": rack,
            "effect": "NoSchedule",
        } in pod["tolerations"]
        assert group["template"]["metadata"]["labels"]["expertmesh.io/node-class"].endswith(
            f"rack-{rack}"
        )


def test_node_classes_group_nodes_by_kind_speed_memory_and_labels():
    homogeneous = load_topology(REPO / "examples" / "topologies" / "homogeneous-4.yaml")
    (only,) = node_classes(homogeneous)
    assert only.nodes == ("cpu-0", "cpu-1", "cpu-2", "cpu-3")
    racks = node_classes(load_topology(REPO / "examples" / "topologies" / "two-racks.yaml"))
    assert [c.nodes for c in racks] == [("r1-a", "r1-b", "r1-c"), ("r2-a", "r2-b", "r2-c")]
    mixed = node_classes(load_topology(REPO / "examples" / "topologies" / "mixed.yaml"))
    assert len(mixed) == 3 and len({c.name for c in mixed}) == 3


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_configmap_topology_is_the_one_the_worker_groups_came_from(overlay, build):
    objects = build(REPO / "manifests" / "overlays" / overlay)
    (config,) = find(objects, "ConfigMap", "expertmesh-config")
    topology = parse_topology(yaml.safe_load(config["data"]["topology.yaml"]))
    for name, spec in ray_cluster_specs(objects).items():
        if name.startswith("RayJob/"):
            continue
        assert [g["groupName"] for g in spec["workerGroupSpecs"]] == [
            n.name for n in topology.nodes
        ]


# ------------------------------------------------------------------------- serving, jobs


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_rayservice_serves_build_app_with_a_valid_serving_config(overlay, build):
    from expertmesh.policies import policy_from_text

    objects = build(REPO / "manifests" / "overlays" / overlay)
    (service,) = find(objects, "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "expertmesh.agents.app:build_app"
    config = parse_platform_config(app["args"]).serving
    (configmap,) = find(objects, "ConfigMap", "expertmesh-config")
    mount = "/etc/expertmesh/"
    assert config.topology == mount + "topology.yaml"
    assert config.policy == mount + "policy.yaml"
    assert {"topology.yaml", "policy.yaml"} <= set(configmap["data"])
    policy_from_text(configmap["data"]["policy.yaml"], "policy.yaml")
    assert config.telemetry["metrics_exporter"] == "prometheus"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_images_point_at_the_overlay_image(overlay, build):
    objects = build(REPO / "manifests" / "overlays" / overlay)
    images = set()
    for spec in ray_cluster_specs(objects).values():
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        images |= {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {OVERLAYS[overlay]["image"]}


def test_gcs_fault_tolerance_and_token_auth_use_secrets_the_dev_overlay_creates(build):
    objects = build(REPO / "manifests" / "overlays" / "dev-cpu")
    secrets = {o["metadata"]["name"]: o for o in find(objects, "Secret")}
    (service,) = find(objects, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    ref = cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secrets[ref["name"]]["stringData"]
    host, port = cluster["gcsFaultToleranceOptions"]["redisAddress"].split(":")
    (redis_service,) = find(objects, "Service", host)
    assert int(port) in [p["port"] for p in redis_service["spec"]["ports"]]
    for spec in ray_cluster_specs(objects).values():
        assert spec["authOptions"] == {"mode": "token", "secretName": "expertmesh-ray-token"}
    assert "auth_token" in secrets["expertmesh-ray-token"]["stringData"]
    assert all(
        o["metadata"]["namespace"] == "expertmesh" for o in objects if o["kind"] != "Namespace"
    )


def test_a_rayjob_template_for_every_pipeline_runs_an_existing_module_and_config(build):
    objects = build(REPO / "manifests" / "overlays" / "dev-cpu")
    jobs = {o["metadata"]["name"]: o for o in find(objects, "RayJob")}
    assert set(jobs) == {f"expertmesh-{j}" for j in TRAINING_JOBS}
    for job in TRAINING_JOBS:
        spec = jobs[f"expertmesh-{job}"]["spec"]
        assert spec["suspend"] is True, "templates start only when unsuspended"
        m = re.fullmatch(
            r"cd /app && python -m expertmesh\.training\.(\w+) --config (\S+)", spec["entrypoint"]
        )
        assert m is not None and m.group(1) == job
        assert (REPO / "training" / f"{job}.py").is_file()
        assert (REPO / m.group(2)).is_file()


def test_a_terminating_worker_pod_drains_its_ray_node_first(tmp_path, build):
    """The preStop hook runs `expertmesh cluster drain` for the pod's own topology node (an
    eviction becomes a planned drain), and the grace period outlasts its wait."""
    objects = build(render_example(tmp_path, REPO / "examples" / "topologies" / "mixed.yaml"))
    parser = build_parser()
    for group in ray_cluster_specs(objects)["RayService/expertmesh"]["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["EXPERTMESH_NODE"] == group["groupName"]
        shell, flag, script = container["lifecycle"]["preStop"]["exec"]["command"]
        assert (shell, flag) == ("/bin/sh", "-c") and script.endswith("|| true")
        script = script.removesuffix("|| true").replace("$EXPERTMESH_NODE", env["EXPERTMESH_NODE"])
        args = parser.parse_args(shlex.split(script.replace("$HOSTNAME", "pod-0"))[1:])
        assert args.func.__name__ == "run_drain" and args.node == group["groupName"]
        assert spec["terminationGracePeriodSeconds"] > args.wait_s > 0


def test_pdb_selects_the_serving_workers(build):
    objects = build(REPO / "manifests" / "overlays" / "dev-cpu")
    (pdb,) = find(objects, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    groups = find(objects, "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for group in groups:
        assert selector.items() <= group["template"]["metadata"]["labels"].items()


def test_metrics_service_and_servicemonitor_reach_the_serve_head(build):
    objects = build(REPO / "manifests" / "overlays" / "dev-cpu")
    (service,) = find(objects, "Service", "expertmesh-metrics")
    (monitor,) = find(objects, "ServiceMonitor")
    head_labels = find(objects, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"][
        "template"
    ]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= head_labels.items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]


def test_otel_collector_pipelines_use_only_configured_components(build):
    objects = build(REPO / "manifests" / "overlays" / "dev-cpu")
    (configmap,) = find(objects, "ConfigMap", "expertmesh-otel-collector")
    config = yaml.safe_load(configmap["data"]["collector.yaml"])
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    for pipeline in config["service"]["pipelines"].values():
        for section in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(section, [])) <= set(config[section])
    (service,) = find(objects, "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    endpoint = app["args"]["telemetry"]["otlp_endpoint"]
    (collector_service,) = find(objects, "Service", "expertmesh-otel-collector")
    assert (
        endpoint
        == f"http://expertmesh-otel-collector:{config['receivers']['otlp']['protocols']['http']['endpoint'].rsplit(':', 1)[1]}"
    )
    assert 4318 in [p["port"] for p in collector_service["spec"]["ports"]]


# ----------------------------------------------------------------------------------- alerts


@pytest.fixture(scope="module")
def emitted_metric_names() -> set[str]:
    """The sample names on /metrics, from the API's and the engine's real instruments with
    one value recorded on each (Prometheus exporter of the OpenTelemetry SDK)."""
    from types import SimpleNamespace

    from opentelemetry.metrics import Counter, Histogram
    from prometheus_client import generate_latest

    from expertmesh.models.checkpoint import read_config
    from expertmesh.models.paths import DEMO_MODEL_DIR
    from expertmesh.observability import TelemetryConfig, configure_telemetry
    from expertmesh.serving.api import Metrics
    from expertmesh.serving.engine_metrics import EngineMetrics

    telemetry = configure_telemetry(TelemetryConfig(metrics_exporter="prometheus"))
    engine = SimpleNamespace(health=lambda: SimpleNamespace(waiting=0, running=0))
    batcher = SimpleNamespace(
        model=SimpleNamespace(config=read_config(DEMO_MODEL_DIR)),
        cache=SimpleNamespace(mode="full"),
        kv_bytes_in_use=lambda: 0,
    )
    instruments = [Metrics(telemetry.meter, engine), EngineMetrics(telemetry.meter, batcher)]
    for holder in instruments:
        for instrument in vars(holder).values():
            if isinstance(instrument, Counter):
                instrument.add(1, {"status": 200})
            elif isinstance(instrument, Histogram):
                instrument.record(0.1)
    from expertmesh.observability.events import FaultEvent
    from expertmesh.observability.fault_metrics import MeteredEvents

    MeteredEvents(None, telemetry.meter).emit(FaultEvent("detected", "bad_policy", "p", source="x"))
    text = generate_latest(telemetry.prometheus_registry).decode()
    return {
        re.split(r"[{ ]", line, maxsplit=1)[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


PROMQL_WORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "le",
    "inf",
    "nan",
}


def metric_names_in(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        if m.group(2) is None and m.group(1).lower() not in PROMQL_WORDS:
            names.add(m.group(1))
    return names


def test_metric_name_extraction_skips_functions_labels_and_keywords():
    expr = 'histogram_quantile(0.95, sum by (le) (rate(foo_bucket{a="x"}[5m]))) > 2 and bar > 1e-9'
    assert metric_names_in(expr) == {"foo_bucket", "bar"}


def test_every_alert_uses_metrics_the_code_emits(emitted_metric_names):
    assert {"expertmesh_requests_total", "expertmesh_router_imbalance"} <= emitted_metric_names
    rule = yaml.safe_load((BASE / "prometheusrule.yaml").read_text())
    used = set()
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            names = metric_names_in(alert["expr"])
            assert names, f"{alert['alert']}: no metric found in {alert['expr']!r}"
            assert names <= emitted_metric_names, (
                f"{alert['alert']}: {names - emitted_metric_names}"
            )
            used |= names
    assert len(used) >= 6


# -------------------------------------------------------------------------------------- CLI


def test_cli_render_writes_an_overlay_that_validates(tmp_path, capsys, build, errors_of):
    out = tmp_path / "overlay"
    topology = REPO / "examples" / "topologies" / "two-racks.yaml"
    rc = main(
        [
            "manifests",
            "render",
            "--topology",
            str(topology),
            "--out",
            str(out),
            "--image",
            "reg.example/em:1.2",
        ]
    )
    assert rc == 0
    assert "class cpu-x1-16gb-rack-r1: r1-a, r1-b, r1-c" in capsys.readouterr().out
    objects = build(out)
    assert [p for o in objects for p in errors_of(o)] == []
    images = {
        c["image"]
        for g in find(objects, "RayCluster")[0]["spec"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    }
    assert images == {"reg.example/em:1.2"}


def test_cli_render_of_a_bad_topology_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nname: bad\nnodes: []\nlinks: {default: {bandwidth_gbps: 1, latency_us: 1}}\n"
    )
    rc = main(["manifests", "render", "--topology", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "invalid topology" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_topology_change_changes_the_serving_head_template(tmp_path, build):
    """The replica reads the topology at start: a new topology (links only, here) must change
    the RayService's cluster template so that KubeRay rolls a new cluster."""
    topology = REPO / "examples" / "topologies" / "two-racks.yaml"
    slower = topology.read_text().replace("bandwidth_gbps: 1,", "bandwidth_gbps: 0.5,")
    assert slower != topology.read_text()
    (tmp_path / "slower.yaml").write_text(slower)

    def head_annotations(path: Path, out: Path) -> dict[str, str]:
        render_overlay(load_topology(path), path.read_text(), out, base=BASE)
        (service,) = find(build(out), "RayService")
        head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
        assert head["spec"]["containers"][0]["name"] == "ray-head", "merge kept the base head"
        return head["metadata"]["annotations"]

    before = head_annotations(topology, tmp_path / "a")
    after = head_annotations(tmp_path / "slower.yaml", tmp_path / "b")
    assert before.keys() == after.keys() == {"expertmesh.io/topology-sha256"}
    assert before != after


@pytest.mark.parametrize(
    ("image", "entry"),
    [
        ("expertmesh:dev", {"newName": "expertmesh", "newTag": "dev"}),
        ("reg.example:5000/team/expertmesh", {"newName": "reg.example:5000/team/expertmesh"}),
        ("reg.example:5000/em:1.0", {"newName": "reg.example:5000/em", "newTag": "1.0"}),
        (
            "reg.example/em@sha256:" + "a" * 64,
            {"newName": "reg.example/em", "digest": "sha256:" + "a" * 64},
        ),
    ],
)
def test_image_argument_becomes_a_kustomize_images_entry(image, entry, tmp_path):
    topology = REPO / "examples" / "topologies" / "mixed.yaml"
    render_overlay(load_topology(topology), topology.read_text(), tmp_path, image=image, base=BASE)
    kustomization = yaml.safe_load((tmp_path / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": "expertmesh", **entry}]


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed"
)
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_resolver_builds_what_kubectl_kustomize_builds(overlay, build):
    """The resolver the validation runs on agrees with real kustomize where it is installed."""
    import subprocess

    directory = REPO / "manifests" / "overlays" / overlay
    text = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    real = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(text) if o}
    mine = {(o["kind"], o["metadata"]["name"]): o for o in build(directory)}
    assert mine.keys() == real.keys()
    for key, obj in mine.items():
        assert json.loads(json.dumps(obj)) == json.loads(json.dumps(real[key])), key
