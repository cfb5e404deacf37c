"""The Kubernetes manifests and the Grafana dashboard agree with the code and the benchmarks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import create_app
from listenerpool.metrics import GatewayMetrics, WorkerMetrics, exposition
from listenerpool.settings import Settings, load_settings
from tests.conftest import ROOT
from workers.status_server import ROUTES as WORKER_ROUTES

K8S = ROOT / "deploy" / "k8s"
SETTING_VARS = {f"LP_{name.upper()}" for name in Settings.model_fields}


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_values(c: dict[str, Any]) -> dict[str, str]:
    values = {}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        values[e["name"]] = (
            find("Secret", ref["name"])["stringData"][ref["key"]] if ref else e["value"]
        )
    for source in c.get("envFrom", []):
        values.update(find("ConfigMap", source["configMapRef"]["name"])["data"])
    return values


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    return int(named[port])


def gateway_routes() -> set[str]:
    """Paths of the gateway app's own routes (included routers are not probe targets)."""
    app = create_app(load_settings(redis_url="redis://unused"))
    return {str(getattr(route, "path", "")) for route in app.routes} - {""}


def bench_density_row(n: str) -> list[str]:
    """The cells of bench/README.md's density results row for ``n`` listeners."""
    for line in (ROOT / "bench" / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == n:
            return cells
    raise AssertionError(f"no density row for {n} in bench/README.md")


def mebibytes(quantity: str) -> float:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, quantity
    return int(match[1]) * (1024 if match[2] == "Gi" else 1)


def test_every_manifest_is_a_named_kubernetes_object() -> None:
    docs = manifests()
    assert {d["kind"] for d in docs} >= {
        "Deployment", "Service", "PodDisruptionBudget", "Secret", "ConfigMap",
    }  # fmt: skip
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc


def test_env_var_names_are_real_settings_and_references_resolve() -> None:
    for doc in manifests():
        if doc["kind"] == "ConfigMap":
            assert set(doc["data"]) <= SETTING_VARS, set(doc["data"]) - SETTING_VARS
        if doc["kind"] != "Deployment":
            continue
        c = container(doc)
        for entry in c.get("env", []):
            assert entry["name"] in SETTING_VARS, entry["name"]
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret = find("Secret", ref["name"])
                assert ref["key"] in secret["stringData"]
        # The settings in force load: a bad value would stop the process at start.
        values = {k.removeprefix("LP_").lower(): v for k, v in env_values(c).items() if v}
        load_settings(**values)


@pytest.mark.parametrize(
    ("name", "port_var", "routes"),
    [
        (
            "listenerpool-gateway",
            "LP_PORT",
            gateway_routes(),
        ),
        ("listenerpool-worker", "LP_METRICS_PORT", set(WORKER_ROUTES)),
    ],
)
def test_probes_and_scrapes_point_at_real_routes_on_the_served_port(
    name: str, port_var: str, routes: set[str]
) -> None:
    deployment = find("Deployment", name)
    c = container(deployment)
    served = int(env_values(c)[port_var])
    probes = [c["livenessProbe"], c["readinessProbe"]]
    assert [p["httpGet"]["path"] for p in probes] == ["/healthz", "/readyz"]
    for probe in probes:
        assert probe["httpGet"]["path"] in routes
        assert port_number(c, probe["httpGet"]["port"]) == served
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes
    assert int(annotations["prometheus.io/port"]) == served


def test_worker_grace_period_and_memory_fit_the_measured_drain_and_footprint() -> None:
    worker = find("Deployment", "listenerpool-worker")
    c = container(worker)
    capacity = int(env_values(c)["LP_WORKER_CAPACITY"])
    assert capacity == 10_000  # the figures below are for 10,000 listeners
    row = bench_density_row("10,000")
    drain = float(row[-1].removesuffix(" s"))
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 2 * drain
    rss_up = float(re.fullmatch(r"\d+ / (\d+) MiB", row[6])[1])  # type: ignore[index]
    resources = c["resources"]
    # Sessions that have published also keep up to LP_RESTORE_BYTES of recent events each.
    remembered = capacity * load_settings().restore_bytes / (1 << 20)
    assert mebibytes(resources["requests"]["memory"]) >= rss_up + remembered
    assert mebibytes(resources["limits"]["memory"]) >= mebibytes(resources["requests"]["memory"])


def test_selectors_match_their_pods() -> None:
    worker_labels = find("Deployment", "listenerpool-worker")["spec"]["template"]["metadata"][
        "labels"
    ]
    gateway_labels = find("Deployment", "listenerpool-gateway")["spec"]["template"]["metadata"][
        "labels"
    ]
    pdb = find("PodDisruptionBudget", "listenerpool-worker")["spec"]["selector"]["matchLabels"]
    assert pdb.items() <= worker_labels.items()
    assert not pdb.items() <= gateway_labels.items()
    service = find("Service", "listenerpool-gateway")
    assert service["spec"]["selector"].items() <= gateway_labels.items()
    assert not service["spec"]["selector"].items() <= worker_labels.items()
    gateway = container(find("Deployment", "listenerpool-gateway"))
    for port in service["spec"]["ports"]:
        assert port_number(gateway, port["targetPort"]) == 8080
    for kind in ("listenerpool-worker", "listenerpool-gateway"):
        spec = find("Deployment", kind)["spec"]
        assert (
            spec["selector"]["matchLabels"].items()
            <= spec["template"]["metadata"]["labels"].items()
        )


def exposed_names() -> set[str]:
    worker = WorkerMetrics()
    worker.watch_listeners(dict)
    names = set()
    for registry in (worker.registry, GatewayMetrics().registry):
        for family in text_string_to_metric_families(exposition(registry).decode()):
            names.add(family.name)  # a histogram's own name, as docs write it
            names |= {sample.name for sample in family.samples}
    return names


def test_the_grafana_dashboard_uses_only_metrics_the_processes_expose() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "listenerpool.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 10
    used = {name for expr in exprs for name in re.findall(r"listenerpool_[a-z_]+", expr)}
    assert used <= exposed_names(), used - exposed_names()
    assert "listenerpool_failovers_total" in used and "listenerpool_events_delivered_total" in used


def test_docs_name_only_exposed_metrics() -> None:
    text = (ROOT / "docs" / "operations.md").read_text() + Path(ROOT / "README.md").read_text()
    named = set(re.findall(r"listenerpool_[a-z_]+[a-z]", text))
    assert named, "no metric named in the docs"
    assert named <= exposed_names(), named - exposed_names()


def test_gateways_listening_beyond_loopback_carry_an_api_token() -> None:
    # Without a token a gateway listens on loopback only, where no Service or probe reaches it.
    gateway = container(find("Deployment", "listenerpool-gateway"))
    values = env_values(gateway)
    settings = load_settings(**{k.removeprefix("LP_").lower(): v for k, v in values.items()})
    assert settings.host == "0.0.0.0"
    assert settings.api_tokens and settings.signing_keys
