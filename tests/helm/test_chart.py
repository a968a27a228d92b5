"""The Helm chart, checked with the official helm binary and Kubernetes' own schemas."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "multichannel-gateway"
HELM = ROOT / ".tools" / "bin" / "helm"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
K8S_VERSION = "1.30.0"
CRDS = {"ServiceMonitor", "PrometheusRule"}
SECRETS = {"META_APP_SECRET": "s3cr3t-app-value", "WHATSAPP_VERIFY_TOKEN": "verify-tok-value",
           "WHATSAPP_ACCESS_TOKEN": "EAAB-access-value", "GATEWAY_API_TOKEN": "api-tok-value",
           "OPENAI_API_KEY": "sk-openai-value"}

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="helm is not installed (make install)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert run.returncode == 0, run.stderr
    return run


def render(*values: Path | dict, tmp_path: Path | None = None) -> list[dict]:
    args = ["template", "gw", str(CHART), "--namespace", "messaging"]
    for i, v in enumerate(values):
        if isinstance(v, dict):
            path = tmp_path / f"values-{i}.yaml"
            path.write_text(yaml.safe_dump(v))
            v = path
        args += ["-f", str(v)]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def kinds(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def gateway_toml(docs: list[dict]) -> str:
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and "gateway.toml" in d.get("data", {})]
    return config["data"]["gateway.toml"]


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_lint_strict(values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    run = helm(*args, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_rendered_manifests_are_valid_kubernetes(values):
    import kubernetes_validate

    docs = render(*([values] if values else []))
    assert docs
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_deployment_probes_security_and_grace(tmp_path):
    docs = render(tmp_path=tmp_path)
    deploy = kinds(docs)["Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "metrics": 9090}
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["fsGroup"] == 10001
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/gateway"]["readOnly"] and "/data" in mounts and "/tmp" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "gw-multichannel-gateway"
    assert pod["terminationGracePeriodSeconds"] == 25 + 5
    assert deploy["spec"]["strategy"]["type"] == "Recreate" and deploy["spec"]["replicas"] == 1
    assert container["args"] == ["serve", "--config", "/etc/gateway/gateway.toml"]


def test_grace_period_follows_shutdown_timeout(tmp_path):
    docs = render({"config": {"server": {"shutdown_timeout": 40}}}, tmp_path=tmp_path)
    assert kinds(docs)["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45
    assert "shutdown_timeout = 40" in gateway_toml(docs)


def test_secrets_never_reach_the_configmap(tmp_path):
    docs = render({"secrets": SECRETS, "redis": {"url": "redis://:redispass-value@redis:6379/0"},
                   "config": {"queue": {"backend": "redis"}}}, tmp_path=tmp_path)
    by_kind = kinds(docs)
    text = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for value in [*SECRETS.values(), "redispass-value"]:
        assert value not in text
    secret = by_kind["Secret"]["data"]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret.items()}
    assert decoded == {**SECRETS, "GATEWAY_REDIS_URL": "redis://:redispass-value@redis:6379/0"}
    (container,) = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "gw-multichannel-gateway"}}]


def test_existing_secret_means_no_secret_rendered(tmp_path):
    docs = render(CHART / "examples" / "existing-secret.yaml")
    assert "Secret" not in kinds(docs)
    (container,) = kinds(docs)["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "gateway-secrets"}}]


def test_redis_existing_secret_is_referenced(tmp_path):
    docs = render(CHART / "examples" / "scaled-out.yaml")
    by_kind = kinds(docs)
    (container,) = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "gateway-redis",
                                                                     "key": "redis-url"}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress", "NetworkPolicy",
            "ServiceMonitor", "PrometheusRule"} <= set(by_kind)
    assert "PersistentVolumeClaim" not in by_kind
    spec = by_kind["Deployment"]["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate" and "replicas" not in spec
    assert len(spec["template"]["spec"]["topologySpreadConstraints"]) == 2
    metrics = by_kind["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert {m["type"] for m in metrics} == {"Resource", "Pods"}
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("dashboard")]
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboards[0]["data"]["multichannel-gateway.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in ("gateway_webhook_requests_total", "gateway_webhook_ack_seconds_bucket",
                 "gateway_sink_latency_seconds_bucket", "gateway_queue_depth", "gateway_dead_letters",
                 "gateway_ratelimit_headroom_ratio", "gateway_response_time_seconds_bucket"):
        assert name in exprs


@pytest.mark.parametrize("values", [{"replicaCount": 2},
                                    {"autoscaling": {"enabled": True}},
                                    {"config": {"queue": {"backend": "redis"}}}])
def test_the_replica_backend_guard_fails_clearly(tmp_path, values):
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(values))
    run = helm("template", "gw", str(CHART), "-f", str(path), check=False)
    assert run.returncode != 0
    assert "redis" in run.stderr and ("exactly one writer" in run.stderr or "redis.url" in run.stderr)


@pytest.mark.parametrize("values,fragment", [
    ({"replicaCount": "three"}, "replicaCount"),
    ({"unknownTopLevel": True}, "unknownTopLevel"),
    ({"config": {"server": {"port": "http", "metrics_port": 9090, "data_dir": "/d",
                            "shutdown_timeout": 1}}}, "port"),
    ({"config": {"channels": {"whatsapp": {"app_secret": "x"}}}}, "app_secret"),
])
def test_schema_rejects_wrong_values(tmp_path, values, fragment):
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(values))
    for command in ("lint", "template"):
        args = [command, *(["gw"] if command == "template" else []), str(CHART), "-f", str(path)]
        run = helm(*args, check=False)
        assert run.returncode != 0, (command, run.stdout)
        assert fragment in run.stdout + run.stderr or "schema" in (run.stdout + run.stderr).lower()


def test_config_change_rolls_the_pods(tmp_path):
    def checksum(values: dict) -> str:
        docs = render(values, tmp_path=tmp_path)
        return kinds(docs)["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) != checksum({"config": {"logging": {"level": "debug"}}})
    assert checksum({}) == checksum({})


def test_notes_print_the_webhook_urls(tmp_path):
    # helm install --dry-run still asks a cluster for its version: render NOTES.txt through a copy
    # of the chart with one more template that includes it.
    import shutil

    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        '    {{- include (print $.Template.BasePath "/NOTES.txt") . | nindent 4 }}\n')
    run = helm("template", "gw", str(chart), "-f", str(CHART / "examples" / "minimal.yaml"),
               "--show-only", "templates/zz-notes.yaml")
    notes = yaml.safe_load(run.stdout)["data"]["notes"]
    assert "https://gateway.example.com/webhooks/whatsapp" in notes
    assert "/webhooks/instagram" not in notes  # minimal.yaml enables WhatsApp only
    assert "curl -s http://127.0.0.1:8080/readyz" in notes


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_the_pod_config_is_what_check_config_accepts(tmp_path, values):
    docs = render(*([values] if values else []))
    text = gateway_toml(docs)
    tomllib.loads(text)
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if "SECRET" not in k and "TOKEN" not in k}
    env.update(SECRETS, GATEWAY_REDIS_URL="redis://127.0.0.1:6379/0")
    run = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, env=env)
    problems = [line for line in run.stderr.splitlines() if "config error" in line]
    missing_plugins = [p for p in problems if "no installed plugin provides" in p]
    assert problems == missing_plugins, run.stderr  # only plugins this environment lacks
    if not problems:
        assert run.returncode == 0, run.stderr
        effective = json.loads(run.stdout)
        assert effective["server"]["data_dir"] == "/data"
        for value in SECRETS.values():
            assert value not in run.stdout


def test_dockerfile_is_multi_stage_non_root_with_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2
    assert "USER 10001" in text and "HEALTHCHECK" in text and "/healthz" in text
    assert "pip wheel" in text and 'ENTRYPOINT ["gateway"]' in text
    for word in ("SECRET=", "TOKEN=", "API_KEY="):
        assert word not in text
    assert ".venv" in (ROOT / ".dockerignore").read_text()


def test_chart_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


def test_alert_rules_pass_promtool_and_use_real_metrics():
    import shutil

    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (make install installs Debian's prometheus)")
    rules = CHART / "rules" / "alerts.yaml"
    run = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    from gateway.metrics import Metrics

    names = {m.name for m in Metrics().registry.collect()}
    for group in yaml.safe_load(rules.read_text())["groups"]:
        for rule in group["rules"]:
            used = [n for n in names if n in rule["expr"]]
            assert used, f"{rule['alert']} uses no metric the gateway exports"
