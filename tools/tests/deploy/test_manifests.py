"""deploy/ (issue 13): every Kustomize overlay renders with `kubectl kustomize`, validates against the Kubernetes
1.32 OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), and is consistent with the server: the
env vars it sets are flags of src/config.rs, the probes hit /health and /ready, selectors match the pods, and
the Redis URL names a Service the overlay creates (or an external host)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "deploy"
OVERLAYS = ["base", "overlays/with-redis", "overlays/external-redis", "overlays/ingress"]
K8S_VERSION = "1.32.0"


def kubectl():
    found = shutil.which("kubectl")
    if not found:
        if os.environ.get("DEEPGROW_REQUIRE_KUBECTL"):
            pytest.fail("DEEPGROW_REQUIRE_KUBECTL is set but kubectl is not installed")
        pytest.skip("kubectl is not installed")
    return found


def render(overlay: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(DEPLOY / overlay)], check=True, capture_output=True,
                         text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def config_flags_env() -> set[str]:
    return set(re.findall(r'env = "(DEEPGROW_[A-Z_]+)"', (REPO / "src/config.rs").read_text()))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    docs = render(overlay)
    assert docs, overlay
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    (config,) = by_kind(docs, "ConfigMap")
    unknown = set(config["data"]) - config_flags_env()
    assert not unknown, f"{overlay}: env vars the server has no flag for: {unknown}"
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    server = deployments["deepgrow-server"]
    pod = server["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["lifecycle"]["preStop"], "a preStop hook holds SIGTERM until endpoints are updated"
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert "limits" in container["resources"] and "requests" in container["resources"]
    delay = float(config["data"]["DEEPGROW_SHUTDOWN_DELAY"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > delay + container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert server["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    for kind in ("Service", "PodDisruptionBudget"):
        matching = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == "deepgrow-server"]
        assert matching, f"{overlay}: no {kind}"
        selector = matching[0]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert all(labels.get(k) == v for k, v in selector.items()), f"{kind} selects no server pod"
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "deepgrow-server"}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"

    store = config["data"]["DEEPGROW_SESSION_STORE"]
    host = re.match(r"redis://(?:[^@]*@)?([^:/]+)", store).group(1)
    services = {d["metadata"]["name"] for d in by_kind(docs, "Service")}
    if overlay == "overlays/external-redis":
        assert host not in services and "deepgrow-redis" not in deployments
    elif overlay != "base":
        assert host in services, f"{overlay}: DEEPGROW_SESSION_STORE names {host}, which no Service is"
    if overlay == "overlays/ingress":
        (ingress,) = by_kind(docs, "Ingress")
        notes = ingress["metadata"]["annotations"]
        assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == "1g"
        assert "session_id" in notes["nginx.ingress.kubernetes.io/upstream-hash-by"]


def test_the_schema_check_can_fail():
    (server,) = [d for d in render("base") if d["kind"] == "Deployment"]
    server["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(server, K8S_VERSION, strict=True)
    server["spec"]["replicas"] = 3
    server["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(server, K8S_VERSION, strict=True)
