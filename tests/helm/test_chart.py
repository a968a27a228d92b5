"""The Helm chart, checked with the official helm binary and Kubernetes' own schemas."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import tomllib

import jsonschema
import pytest
import yaml

from tests.helm.chart import (
    CHART,
    CRDS,
    EXAMPLES,
    HELM,
    K8S_VERSION,
    REDIS,
    ROOT,
    SECRETS,
    check_config,
    container,
    gateway_toml,
    helm,
    kinds,
    notes,
    render,
    render_error,
)

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="helm is not installed (make install)")

# kubernetes-validate has no schemas for the Prometheus Operator's CRDs: the fields the operator
# requires (and the types it checks) of monitoring.coreos.com/v1 ServiceMonitor and PrometheusRule.
DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}, "labels": LABELS}}
CRD_SCHEMAS = {
    "ServiceMonitor": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "metadata": METADATA,
            "spec": {"type": "object", "required": ["selector", "endpoints"], "properties": {
                "selector": {"type": "object", "required": ["matchLabels"],
                             "properties": {"matchLabels": LABELS}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": DURATION, "scrapeTimeout": DURATION}}}}}}},
    "PrometheusRule": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "metadata": METADATA,
            "spec": {"type": "object", "required": ["groups"], "additionalProperties": False,
                     "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["name", "rules"],
                         "properties": {"name": {"type": "string", "minLength": 1},
                                        "interval": DURATION,
                                        "rules": {"type": "array", "minItems": 1, "items": {
                                            "type": "object", "required": ["expr"],
                                            "additionalProperties": False,
                                            "oneOf": [{"required": ["alert"]},
                                                      {"required": ["record"]}],
                                            "properties": {
                                                "alert": {"type": "string"},
                                                "record": {"type": "string"},
                                                "expr": {"type": ["string", "integer"]},
                                                "for": DURATION, "keep_firing_for": DURATION,
                                                "labels": LABELS,
                                                "annotations": LABELS}}}}}}}}}},
}


def validate_crd(doc: dict, docs: list[dict]) -> None:
    jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
    if doc["kind"] == "ServiceMonitor":  # it must select the chart's Service and a port it has
        service = kinds(docs)["Service"]
        selector = doc["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in doc["spec"]["endpoints"]} <= ports


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_lint_strict(values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    run = helm(*args, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Fail:" not in run.stderr  # helm lint only logs a template's fail(): none may fire


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_rendered_manifests_are_valid_kubernetes(values):
    import kubernetes_validate

    docs = render(*([values] if values else []))
    assert docs
    for doc in docs:
        if doc["kind"] in CRDS:
            validate_crd(doc, docs)
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("doc", [
    {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
     "spec": {"selector": {"matchLabels": {}}, "endpoints": [{"port": 9090}]}},
    {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
     "spec": {"endpoints": [{"port": "metrics"}]}},
    {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"},
     "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up", "for": "5 min"}]}]}},
    {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"},
     "spec": {"groups": [{"rules": [{"alert": "A", "expr": "up"}]}]}},
], ids=["port-not-a-name", "no-selector", "bad-duration", "group-without-name"])
def test_crd_checks_reject_broken_objects(doc):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])


def test_deployment_probes_security_and_grace(tmp_path):
    docs = render(tmp_path=tmp_path)
    deploy = kinds(docs)["Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["startupProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"http": 8080, "metrics": 9090}
    sc = gateway["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"]
    assert not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["fsGroup"] == 10001
    mounts = {m["mountPath"]: m for m in gateway["volumeMounts"]}
    assert mounts["/etc/gateway"]["readOnly"] and "/data" in mounts and "/tmp" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "gw-multichannel-gateway"
    # preStop 5 s, in-flight requests 25 s, journal and sinks 25 s, outbound 5 s, margin 5 s
    assert gateway["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    assert pod["terminationGracePeriodSeconds"] == 5 + 25 + 25 + 5 + 5
    assert deploy["spec"]["strategy"]["type"] == "Recreate" and deploy["spec"]["replicas"] == 1
    assert gateway["args"] == ["serve", "--config", "/etc/gateway/gateway.toml"]


@pytest.mark.parametrize("shutdown_timeout,pre_stop", [(40, 5), (12.5, 5), (0, 0), (25, 10)])
def test_grace_period_follows_shutdown_timeout(tmp_path, shutdown_timeout, pre_stop):
    docs = render({"config": {"server": {"shutdown_timeout": shutdown_timeout}},
                   "shutdown": {"preStopSleepSeconds": pre_stop}}, tmp_path=tmp_path)
    pod = kinds(docs)["Deployment"]["spec"]["template"]["spec"]
    expected = 2 * math.ceil(shutdown_timeout) + 5 + pre_stop + 5
    assert pod["terminationGracePeriodSeconds"] == expected
    assert tomllib.loads(gateway_toml(docs))["server"]["shutdown_timeout"] == shutdown_timeout
    if pre_stop:
        assert pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] == pre_stop
    else:
        assert "lifecycle" not in pod["containers"][0]


def test_grace_period_can_be_set_explicitly(tmp_path):
    docs = render({"shutdown": {"terminationGracePeriodSeconds": 120}}, tmp_path=tmp_path)
    pod = kinds(docs)["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120


def test_pre_stop_runs_the_images_sleep_before_kubernetes_1_30(tmp_path):
    import kubernetes_validate

    docs = render(tmp_path=tmp_path, kube_version="1.29.4")
    assert container(docs)["lifecycle"]["preStop"] == {"exec": {"command": ["/bin/sleep", "5"]}}
    kubernetes_validate.validate(kinds(docs)["Deployment"], "1.29.0", strict=True)
    gke = render(tmp_path=tmp_path, kube_version="v1.30.2-gke.1587003")
    assert container(gke)["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}


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
    assert container(docs)["envFrom"] == [{"secretRef": {"name": "gw-multichannel-gateway"}}]


def test_existing_secret_means_no_secret_rendered(tmp_path):
    docs = render(CHART / "examples" / "existing-secret.yaml")
    assert "Secret" not in kinds(docs)
    assert container(docs)["envFrom"] == [{"secretRef": {"name": "gateway-secrets"}}]


def test_redis_existing_secret_is_referenced(tmp_path):
    docs = render(CHART / "examples" / "scaled-out.yaml")
    by_kind = kinds(docs)
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "gateway-redis",
                                                                     "key": "redis-url"}
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress", "NetworkPolicy",
            "ServiceMonitor", "PrometheusRule"} <= set(by_kind)
    assert "PersistentVolumeClaim" not in by_kind
    spec = by_kind["Deployment"]["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate" and "replicas" not in spec
    assert len(spec["template"]["spec"]["topologySpreadConstraints"]) == 2
    metrics = by_kind["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert {m["type"] for m in metrics} == {"Resource", "External"}
    dashboards = [d for d in docs
                  if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("dashboard")]
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboards[0]["data"]["multichannel-gateway.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for name in ("gateway_webhook_requests_total", "gateway_webhook_ack_seconds_bucket",
                 "gateway_sink_latency_seconds_bucket", "gateway_queue_depth",
                 "gateway_dead_letters",
                 "gateway_ratelimit_headroom_ratio", "gateway_response_time_seconds_bucket"):
        assert name in exprs


def test_hpa_scales_on_the_shared_backlog_as_an_external_metric(tmp_path):
    """Every pod exports the same shared Redis backlog: a Pods metric would average identical
    values (average = total), so the queue depth is one External metric, AverageValue target:
    desired replicas = ceil(backlog / averageValue)."""
    values = {**REDIS, "config": {**REDIS["config"], "sinks": {"storage": None}},
              "autoscaling": {"enabled": True,
                              "queueDepth": {"enabled": True, "averageValue": "400"}}}
    hpa = kinds(render(values, tmp_path=tmp_path))["HorizontalPodAutoscaler"]
    (queue,) = [m for m in hpa["spec"]["metrics"] if m["type"] != "Resource"]
    assert queue == {"type": "External", "external": {
        "metric": {"name": "gateway_queue_depth",
                   "selector": {"matchLabels": {"queue": "journal",
                                                "service": "gw-multichannel-gateway"}}},
        "target": {"type": "AverageValue", "averageValue": "400"}}}
    assert not any(m["type"] == "Pods" for m in hpa["spec"]["metrics"])
    values["autoscaling"]["queueDepth"].update(metricName="gw_backlog",
                                               selector={"queue": "journal"})
    hpa = kinds(render(values, tmp_path=tmp_path))["HorizontalPodAutoscaler"]
    (queue,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    assert queue["external"]["metric"] == {"name": "gw_backlog",
                                           "selector": {"matchLabels": {"queue": "journal"}}}
    values["autoscaling"]["queueDepth"]["enabled"] = False
    hpa = kinds(render(values, tmp_path=tmp_path))["HorizontalPodAutoscaler"]
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource"]


@pytest.mark.parametrize("values", [{"replicaCount": 2},
                                    {"autoscaling": {"enabled": True}},
                                    {"config": {"queue": {"backend": "redis"}}}])
def test_the_replica_backend_guard_fails_clearly(tmp_path, values):
    stderr = render_error(values, tmp_path=tmp_path)
    assert "redis" in stderr and ("exactly one writer" in stderr or "redis.url" in stderr)


@pytest.mark.parametrize("values,message", [
    ({"replicaCount": "three"}, "replicaCount: Invalid type. Expected: integer, given: string"),
    ({"unknownTopLevel": True}, "Additional property unknownTopLevel is not allowed"),
    ({"config": {"server": {"port": "http", "metrics_port": 9090, "data_dir": "/d",
                            "shutdown_timeout": 1}}},
     "config.server.port: Invalid type. Expected: integer, given: string"),
    ({"config": {"queue": {"backend": "kafka"}}},
     "config.queue.backend: config.queue.backend must be"),
    ({"shutdown": {"preStopSleepSeconds": -1}},
     "shutdown.preStopSleepSeconds: Must be greater than"),
    ({"redis": {"uri": "redis://x"}}, "redis: Additional property uri is not allowed"),
    ({"config": {"channels": {"whatsapp": {"app_secret": "x"}}}},
     "config.channels.whatsapp.app_secret is a secret and would be written in plain text"),
    # values the gateway refuses at start (check-config exits 2): the pod would crash-loop
    ({"config": {"queue": {"retry_after_seconds": 0}}},
     "config.queue.retry_after_seconds: Must be greater than or equal to 1"),
    ({"config": {"queue": {"dedupe_window_seconds": 0}}},
     "config.queue.dedupe_window_seconds: Must be greater than or equal to 1"),
    ({"config": {"channels": {"whatsapp": {"phone_number_id": 106540352242922}}}},
     "config.channels.whatsapp.phone_number_id: Invalid type. Expected: string"),
    ({"config": {"channels": {"whatsapp": {"accounts": [{"phone_number_id": 1065403522}]}}}},
     "phone_number_id: Invalid type. Expected: string"),
    ({"config": {"channels": {"instagram": {"page_id": 17841400000000000}}}},
     "config.channels.instagram.page_id: Invalid type. Expected: string"),
])
def test_schema_rejects_wrong_values(tmp_path, values, message):
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(values))
    template = helm("template", "gw", str(CHART), "-f", str(path), check=False)
    assert template.returncode != 0, template.stdout
    assert message in template.stderr
    if "secret" not in message:  # a schema error fails lint too (lint only logs a template fail)
        lint = helm("lint", str(CHART), "-f", str(path), check=False)
        assert lint.returncode != 0 and message in lint.stdout + lint.stderr


def test_config_change_rolls_the_pods(tmp_path):
    def checksum(values: dict) -> str:
        docs = render(values, tmp_path=tmp_path)
        pod = kinds(docs)["Deployment"]["spec"]["template"]
        return pod["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) != checksum({"config": {"logging": {"level": "debug"}}})
    assert checksum({}) == checksum({})


def test_notes_print_the_webhook_urls(tmp_path):
    text = notes(tmp_path, CHART / "examples" / "minimal.yaml")
    assert "https://gateway.example.com/webhooks/whatsapp" in text
    assert "/webhooks/instagram" not in text  # minimal.yaml enables WhatsApp only
    assert "curl -s http://127.0.0.1:8080/readyz" in text
    assert "WARNING" not in text


@pytest.mark.parametrize("values,missing", [
    ({}, "instagram, whatsapp"),
    ({"secrets": {"WHATSAPP_APP_SECRET": "x"}}, "instagram"),
    ({"secrets": {"META_APP_SECRET": "x"}}, None),
    ({"existingSecret": "mine"}, None),
    ({"config": {"server": {"insecure_skip_signature": True}}}, None),
    ({"extraEnv": [{"name": "META_APP_SECRET",
                    "valueFrom": {"secretKeyRef": {"name": "m", "key": "k"}}}]}, None),
    ({"secrets": {"WHATSAPP_APP_SECRET": "x"},
      "config": {"channels": {"instagram": {"app_secret": {"env": "IG_SECRET"}}}}}, None),
    ({"secrets": {"WHATSAPP_APP_SECRET": "x"},
      "config": {"channels": {"instagram": {"enabled": False}}}}, None),
], ids=["defaults", "one-channel", "meta", "existing", "insecure", "extra-env", "reference",
        "disabled"])
def test_notes_warn_when_no_app_secret_is_provided(tmp_path, values, missing):
    """The defaults enable both channels with no secret: the gateway would exit 2 (crash loop)."""
    text = notes(tmp_path, values)
    if missing:
        assert f"WARNING: no app secret for the enabled channel(s) {missing}." in text
        assert "secrets.META_APP_SECRET" in text and "existingSecret" in text
    else:
        assert "WARNING" not in text


def test_notes_say_where_the_audit_log_lives_with_redis(tmp_path):
    values = {**REDIS, "secrets": {"META_APP_SECRET": "x"}}
    assert "erasures.jsonl" in notes(tmp_path, values)
    assert "erasures.jsonl" not in notes(tmp_path, {"secrets": {"META_APP_SECRET": "x"}})


@pytest.mark.parametrize("storage", [None, {"enabled": False}], ids=["default", "off"])
def test_notes_warn_that_a_redis_pods_storage_database_is_on_its_emptydir(tmp_path, storage):
    """One Redis-backed replica may keep the SQLite storage sink (the guard allows it), but its
    file lives on the pod's emptyDir and is lost at each rollout: say so when installing."""
    values = {**REDIS, "secrets": {"META_APP_SECRET": "x"}}
    if storage is not None:
        values["config"] = {**values.get("config", {}), "sinks": {"storage": storage}}
    text = notes(tmp_path, values)
    assert ("WARNING: the SQLite storage sink is enabled with the redis backend" in text) == (
        storage is None)
    assert "storage sink is enabled" not in notes(tmp_path, {"secrets": {"META_APP_SECRET": "x"}})


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.name if v else "defaults")
def test_the_pod_config_is_what_check_config_accepts(tmp_path, values):
    docs = render(*([values] if values else []))
    text = gateway_toml(docs)
    tomllib.loads(text)
    run = check_config(text, tmp_path)
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
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert sum(line.startswith("FROM ") for line in instructions) >= 2
    assert "USER 10001:10001" in instructions and "pip wheel" in text
    for word in ("SECRET=", "TOKEN=", "API_KEY="):
        assert word not in text
    # `docker run IMAGE` runs `gateway serve` on the embedded defaults (CONTRACT §2); the chart
    # passes its own args (serve --config ...).
    assert instructions[-2:] == ['ENTRYPOINT ["gateway"]', 'CMD ["serve"]']
    (healthcheck,) = [line for line in instructions if line.startswith("HEALTHCHECK")]
    lines = text.splitlines()
    start = lines.index(healthcheck)
    check = " ".join(lines[start:start + 2])
    assert "/healthz" in check and "GATEWAY_HEALTHCHECK_PORT" in check and ":8080/" not in check
    assert "GATEWAY_HEALTHCHECK_PORT=8080" in text
    assert ".venv" in (ROOT / ".dockerignore").read_text()


def test_the_image_build_context_has_every_package_file():
    """The wheel is built from what the Dockerfile copies: every package directory (and its
    package data, e.g. sinks/firestore/indexes.json) is copied and not excluded by .dockerignore."""
    import fnmatch

    text = (ROOT / "Dockerfile").read_text()
    copied = {source for line in text.splitlines()
              if line.startswith("COPY ") and "--from" not in line
              for source in line.split()[1:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {p.rstrip("*") for p in packages} | {"pyproject.toml", project["project"]["readme"]}
    assert needed <= copied
    ignored = [p for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p and not p.startswith(("#", "!"))]
    data = project["tool"]["setuptools"].get("package-data", {})
    assert data.get("sinks.firestore") and "indexes.json" in data["sinks.firestore"]
    for package, patterns in data.items():
        for pattern in patterns:
            for path in (ROOT / package.replace(".", "/")).glob(pattern):
                rel = path.relative_to(ROOT).as_posix()
                assert not any(fnmatch.fnmatch(rel, p.removeprefix("**/")) or
                               fnmatch.fnmatch(path.name, p.removeprefix("**/")) or
                               rel.startswith(p.rstrip("/") + "/") for p in ignored), rel


def test_chart_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


def test_alert_rules_fire_when_they_should_and_only_then():
    """``promtool test rules`` on rules/alerts_test.yaml: a single 503 pages no one, sustained
    ones do; an expired token pages; a growing outbox warns."""
    import shutil

    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (make install installs Debian's prometheus)")
    run = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], capture_output=True,
                         text=True, timeout=60, cwd=CHART / "rules")
    assert run.returncode == 0, run.stdout + run.stderr


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
