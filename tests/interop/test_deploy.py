"""The operations files: Kubernetes manifests (deploy/), the compose stack's configuration (docker/,
docker-compose.yml) and their agreement with the plugin services under services/.

- Every manifest, as `kubectl apply -k deploy/` applies it (kustomization.yaml lists resources only)
  plus the Consul variant, validates offline against the Kubernetes API schemas of the oldest and
  the newest version kubernetes-validate carries from 1.27 on (gRPC probes are GA since 1.27), in
  strict mode (unknown fields are errors).
- Every plugin service under services/ has its ServiceAccount, Deployment (gRPC readiness and
  liveness probes on 8000, requests and limits, scrape annotations), headless Service, HPA and PDB;
  an entry in the gateway's ConfigMap (`dns://`), in the Consul variant (`srv://`), in the compose
  gateway config;
  a compose service and a Prometheus DNS-SD name. A new plugin directory fails these tests until
  its operations files exist.
- Every gateway configuration shipped (the ConfigMap, the Consul variant, docker/gateway.toml)
  passes the real `flotilla-gateway --check-config`.

Nothing here needs a cluster or Docker; the gateway binary is $FLOTILLA_GATEWAY_BIN, else next to
$FLOTILLA_BIN, else <repo>/target/debug/flotilla-gateway.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Dict, List

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
NAMESPACE = "flyte"
SECRET_MOUNTS = {  # plugin -> (Secret name, file the service reads under /etc/secrets)
    "bigquery": ("flotilla-bigquery", "service-account.json"),
    "databricks": ("flotilla-databricks", "flyte_databricks_access_token"),
    "snowflake": ("flotilla-snowflake", "snowflake_private_key"),
}
REQUIRED_KINDS = ("ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget")


def _k8s_versions() -> List[str]:
    usable = sorted(
        {v for v in kubernetes_validate.utils.all_versions() if tuple(map(int, v.split(".")[:2])) >= (1, 27)},
        key=lambda v: tuple(map(int, v.split("."))),
    )
    assert usable, "kubernetes-validate carries no schema for Kubernetes >= 1.27"
    return sorted({usable[0], usable[-1]})


def _plugins() -> List[str]:
    found = sorted(p.name for p in (REPO / "services").iterdir() if (p / "Cargo.toml").is_file())
    assert found, "no plugin service under services/"
    return found


def _load_all(path: Path) -> List[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as err:
        pytest.fail(f"{path.relative_to(REPO)} is not valid YAML: {err}", pytrace=False)
    for d in docs:
        assert isinstance(d, dict) and "kind" in d, f"{path.relative_to(REPO)}: a document without `kind`"
    return docs


def _render() -> Dict[str, List[dict]]:
    """What `kubectl apply -k deploy/` applies, per file. Only `resources` may be used."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    extra = set(kustomization) - {"apiVersion", "kind", "resources"}
    assert not extra, f"deploy/kustomization.yaml uses {sorted(extra)}, which this test does not render"
    rendered = {}
    for res in kustomization["resources"]:
        path = DEPLOY / res
        assert path.is_file(), f"deploy/kustomization.yaml lists {res}, which does not exist"
        rendered[res] = _load_all(path)
    return rendered


@pytest.fixture(scope="module")
def rendered() -> Dict[str, List[dict]]:
    return _render()


def _objects(rendered) -> List[dict]:
    return [d for docs in rendered.values() for d in docs]


def _find(objs: List[dict], kind: str, name: str) -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind} named {name}, found {len(hits)}"
    return hits[0]


def _gateway_toml(configmap: dict) -> dict:
    return tomllib.loads(configmap["data"]["gateway.toml"])


def _gateway_binary() -> Path:
    if os.environ.get("FLOTILLA_GATEWAY_BIN"):
        return Path(os.environ["FLOTILLA_GATEWAY_BIN"])
    if os.environ.get("FLOTILLA_BIN"):
        return Path(os.environ["FLOTILLA_BIN"]).parent / "flotilla-gateway"
    return REPO / "target" / "debug" / "flotilla-gateway"


# ------------------------------------------------------------------ schemas


@pytest.mark.parametrize("version", _k8s_versions())
def test_manifests_validate_against_kubernetes_schemas(rendered, version):
    files = dict(rendered)
    files["consul/gateway-config.yaml"] = _load_all(DEPLOY / "consul" / "gateway-config.yaml")
    problems = []
    count = 0
    for name, docs in files.items():
        for doc in docs:
            count += 1
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except Exception as err:  # noqa: BLE001 - every failure is reported with its object
                first = str(err).splitlines()[0]
                problems.append(f"{name}: {doc['kind']}/{doc['metadata'].get('name')}: {first}")
    assert not problems, f"{len(problems)} of {count} objects invalid for Kubernetes {version}:\n" + "\n".join(problems)


def test_every_yaml_under_deploy_is_applied_or_documented():
    listed = set(_render())
    for path in sorted(DEPLOY.rglob("*.yaml")):
        rel = str(path.relative_to(DEPLOY))
        if rel == "kustomization.yaml" or rel.startswith(("consul/", "propeller/")):
            continue
        assert rel in listed, f"deploy/{rel} is not listed in deploy/kustomization.yaml"


# ------------------------------------------------------------ per plugin


@pytest.mark.parametrize("plugin", _plugins())
def test_plugin_has_all_its_kubernetes_objects(rendered, plugin):
    res = f"plugins/{plugin}.yaml"
    assert res in rendered, f"services/{plugin} has no deploy/{res} listed in deploy/kustomization.yaml"
    objs = rendered[res]
    kinds = sorted(o["kind"] for o in objs)
    for kind in REQUIRED_KINDS:
        assert kind in kinds, f"deploy/{res} lacks a {kind} (has {kinds})"
    name = f"flotilla-{plugin}"
    for o in objs:
        assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']}/{o['metadata']['name']} not in {NAMESPACE}"

    sa = _find(objs, "ServiceAccount", name)
    dep = _find(objs, "Deployment", name)
    svc = _find(objs, "Service", f"{name}-headless")
    hpa = _find(objs, "HorizontalPodAutoscaler", name)
    pdb = _find(objs, "PodDisruptionBudget", name)

    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), "Deployment selector does not match its pods"
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert pod_labels.get("app.kubernetes.io/component") == "plugin", "pods need component=plugin (NetworkPolicy)"
    ann = dep["spec"]["template"]["metadata"].get("annotations", {})
    assert ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9090", ann

    (container,) = pod["containers"]
    assert container["image"].startswith(f"flotilla/{plugin}:"), container["image"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert {8000, 9090} <= ports, ports
    for probe in ("readinessProbe", "livenessProbe"):
        assert container.get(probe, {}).get("grpc", {}).get("port") == 8000, f"{name}: {probe} must be grpc on 8000"
    for part in ("requests", "limits"):
        got = container.get("resources", {}).get(part, {})
        assert {"cpu", "memory"} <= set(got), f"{name}: resources.{part} needs cpu and memory, has {got}"
    assert pod["securityContext"].get("runAsNonRoot") is True

    assert svc["spec"].get("clusterIP") == "None", f"{name}-headless must be headless (clusterIP: None)"
    assert svc["spec"]["selector"].items() <= pod_labels.items(), "headless Service selects no pod"
    assert 8000 in {p["port"] for p in svc["spec"]["ports"]}

    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert hpa["spec"]["minReplicas"] >= 2, "fewer than 2 replicas leave the PDB nothing to keep"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), "PDB selects no pod"

    if plugin in SECRET_MOUNTS:
        secret, file = SECRET_MOUNTS[plugin]
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        assert "/etc/secrets" in mounts, f"{name}: the Secret must be mounted at /etc/secrets"
        vol = vols[mounts["/etc/secrets"]["name"]]
        assert vol.get("secret", {}).get("secretName") == secret, vol
        assert vol["secret"].get("optional") is True, "the service must start without its Secret"
        assert pod["securityContext"].get("fsGroup") == 65532, "the non-root user must be able to read the Secret"
        assert file in (REPO / "deploy" / res).read_text(), f"deploy/{res} never names {file}"


@pytest.mark.parametrize("plugin", _plugins())
def test_plugin_is_discovered_by_the_gateway_and_scraped(rendered, plugin):
    gateway = _gateway_toml(_find(_objects(rendered), "ConfigMap", "flotilla-gateway"))
    targets = {p["name"]: p["discovery"] for p in gateway.get("plugins", [])}
    want = f"dns://flotilla-{plugin}-headless.{NAMESPACE}.svc.cluster.local:8000"
    assert targets.get(plugin) == want, f"gateway ConfigMap: {plugin} should be discovered at {want}, has {targets}"

    consul = _gateway_toml(_load_all(DEPLOY / "consul" / "gateway-config.yaml")[0])
    consul_targets = {p["name"]: p["discovery"] for p in consul.get("plugins", [])}
    assert consul_targets.get(plugin) == f"srv://flotilla-{plugin}.service.consul", consul_targets

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    service = compose["services"].get(plugin)
    assert service, f"docker-compose.yml has no service {plugin}"
    assert service["image"].startswith(f"flotilla/{plugin}:"), service["image"]
    assert "ports" not in service, f"compose service {plugin} must not be published (only the gateway is)"

    compose_gateway = tomllib.loads((REPO / "docker" / "gateway.toml").read_text())
    compose_targets = {p["name"]: p["discovery"] for p in compose_gateway.get("plugins", [])}
    assert compose_targets.get(plugin) == f"dns://{plugin}:8000", compose_targets

    prom = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    names = {
        n
        for job in prom["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        if sd.get("type") == "A" and sd.get("port") == 9090
        for n in sd["names"]
    }
    assert plugin in names, f"docker/prometheus.yml scrapes no DNS name {plugin} (has {sorted(names)})"


# ------------------------------------------------------------------ gateway


def test_gateway_objects_and_network_policy(rendered):
    objs = _objects(rendered)
    dep = _find(objs, "Deployment", "flotilla-gateway")
    svc = _find(objs, "Service", "flotilla-gateway")
    _find(objs, "ServiceAccount", "flotilla-gateway")
    _find(objs, "PodDisruptionBudget", "flotilla-gateway")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 8000
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) & set(container["resources"]["limits"])
    assert "--config" in container["args"]
    mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_vol = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "flotilla-gateway")
    config_path = container["args"][container["args"].index("--config") + 1]
    assert config_path == f"{mounted[config_vol['name']]}/gateway.toml", (config_path, mounted)
    assert {p["port"] for p in svc["spec"]["ports"]} >= {8000}
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()

    policy = _find(objs, "NetworkPolicy", "flotilla-gateway")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    grpc_rules = [r for r in policy["spec"]["ingress"] if {"port": 8000, "protocol": "TCP"} in r.get("ports", [])]
    assert len(grpc_rules) == 1, "one ingress rule opens the gateway's gRPC port"
    peers = grpc_rules[0].get("from", [])
    assert peers, "an ingress rule without `from` would let every pod in"
    allowed = [p["podSelector"]["matchLabels"] for p in peers]
    assert all(set(p) == {"podSelector"} for p in peers), "only pods of the namespace (no namespaceSelector/ipBlock)"
    assert {"app.kubernetes.io/name": "flytepropeller"} in allowed, allowed
    assert {"flotilla.io/operator": "true"} in allowed, allowed


@pytest.mark.parametrize("snippet", ["agent-service.yaml", "connector-service.yaml"])
def test_propeller_config_points_at_the_gateway(rendered, snippet):
    conf = yaml.safe_load((DEPLOY / "propeller" / snippet).read_text())
    plugin = snippet.removesuffix(".yaml")
    section = conf["plugins"][plugin]
    default = section["defaultAgent" if plugin == "agent-service" else "defaultConnector"]
    svc = _find(_objects(rendered), "Service", "flotilla-gateway")
    assert default["endpoint"] == f"k8s://{svc['metadata']['name']}.{svc['metadata']['namespace']}:8000"
    assert default["insecure"] is True
    assert plugin in conf["tasks"]["task-plugins"]["enabled-plugins"]


def _check_config(toml_text: str, tmp_path: Path, name: str) -> None:
    binary = _gateway_binary()
    if not binary.is_file():
        pytest.fail(f"{binary} not found: cargo build --bin flotilla-gateway, or set FLOTILLA_GATEWAY_BIN", pytrace=False)
    path = tmp_path / name
    path.write_text(toml_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_")}
    done = subprocess.run(
        [str(binary), "--config", str(path), "--check-config"],
        capture_output=True, text=True, timeout=30, env=env,
    )
    assert done.returncode == 0, f"flotilla-gateway --check-config rejects {name}:\n{done.stdout}\n{done.stderr}"


def test_shipped_gateway_configs_pass_check_config(rendered, tmp_path):
    cm = _find(_objects(rendered), "ConfigMap", "flotilla-gateway")
    _check_config(cm["data"]["gateway.toml"], tmp_path, "configmap.toml")
    consul = _load_all(DEPLOY / "consul" / "gateway-config.yaml")[0]
    _check_config(consul["data"]["gateway.toml"], tmp_path, "consul.toml")
    _check_config((REPO / "docker" / "gateway.toml").read_text(), tmp_path, "compose.toml")


def test_check_config_catches_a_broken_target(tmp_path):
    """The check above can fail: a discovery target the gateway cannot parse is rejected."""
    with pytest.raises(AssertionError, match="rejects"):
        _check_config('[[plugins]]\nname = "echo"\ndiscovery = "dns://no-port"\n', tmp_path, "broken.toml")


def test_compose_publishes_only_the_gateway_and_prometheus():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    published = sorted(name for name, s in compose["services"].items() if s.get("ports"))
    assert published == ["gateway", "prometheus"], published
    for name, s in compose["services"].items():
        assert re.fullmatch(r"flotilla/[a-z0-9-]+:\$\{FLOTILLA_TAG:-dev\}", s["image"]), (name, s["image"])
