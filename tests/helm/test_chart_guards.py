"""The chart refuses values that would run but lose, leak or misroute data, naming what to set."""

from __future__ import annotations

import base64
import tomllib

import pytest
import yaml

from tests.helm.chart import (
    CHART,
    HELM,
    K8S_VERSION,
    REDIS,
    check_config,
    container,
    gateway_toml,
    kinds,
    render,
    render_error,
)

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="helm is not installed (make install)")

SCALED = {**REDIS, "replicaCount": 3}
STORAGE_MESSAGE = ("the storage sink is SQLite on one pod's disk (an emptyDir with the redis "
                   "backend), so each replica would keep its own partial copy. With several "
                   "replicas use the firestore sink or another shared sink, or disable it")


# -- 1. the SQLite storage sink with several replicas ----------------------------------------------

@pytest.mark.parametrize("values", [
    SCALED,
    {**REDIS, "autoscaling": {"enabled": True}},
    {**SCALED, "config": {**SCALED["config"], "sinks": {"storage": {"batch_size": 50}}}},
], ids=["replicas", "autoscaling", "configured"])
def test_storage_sink_with_several_replicas_fails(tmp_path, values):
    stderr = render_error(values, tmp_path=tmp_path)
    assert "config.sinks.storage is enabled with several replicas" in stderr
    assert STORAGE_MESSAGE in stderr


@pytest.mark.parametrize("storage,table", [(None, None), ({"enabled": False}, {"enabled": False})],
                         ids=["null", "enabled-false"])
def test_storage_sink_can_be_switched_off_for_several_replicas(tmp_path, storage, table):
    sinks = {"storage": storage, "jsonl": {"path": "/data/e.jsonl"}}
    values = {**SCALED, "config": {**SCALED["config"], "sinks": sinks}}
    docs = render(values, tmp_path=tmp_path)
    text = gateway_toml(docs)
    assert tomllib.loads(text)["sinks"].get("storage") == table
    run = check_config(text, tmp_path)
    assert run.returncode == 0, run.stderr


def test_one_redis_replica_may_keep_the_storage_sink(tmp_path):
    docs = render(REDIS, tmp_path=tmp_path)
    assert "storage" in tomllib.loads(gateway_toml(docs))["sinks"]


def test_the_scaled_out_example_has_no_storage_sink():
    docs = render(CHART / "examples" / "scaled-out.yaml")
    sinks = tomllib.loads(gateway_toml(docs))["sinks"]
    assert sinks["storage"] == {"enabled": False} and "firestore" in sinks


# -- 3. redis.url with existingSecret --------------------------------------------------------------

def test_redis_url_with_existing_secret_fails_and_says_what_to_set(tmp_path):
    values = {**REDIS, "existingSecret": "gateway-secrets"}
    stderr = render_error(values, tmp_path=tmp_path)
    assert "redis.url is set together with existingSecret" in stderr
    assert "set redis.existingSecret (and redis.existingSecretKey)" in stderr


def test_redis_existing_secret_with_existing_secret_renders(tmp_path):
    values = {"config": REDIS["config"], "existingSecret": "gateway-secrets",
              "redis": {"existingSecret": "gateway-secrets",
                        "existingSecretKey": "GATEWAY_REDIS_URL"}}
    docs = render(values, tmp_path=tmp_path)
    assert "Secret" not in kinds(docs)
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "gateway-secrets", "key": "GATEWAY_REDIS_URL"}


def test_redis_url_goes_into_the_charts_secret(tmp_path):
    docs = render(REDIS, tmp_path=tmp_path)
    data = kinds(docs)["Secret"]["data"]
    assert base64.b64decode(data["GATEWAY_REDIS_URL"]).decode() == "redis://redis:6379/0"
    assert container(docs)["envFrom"] == [{"secretRef": {"name": "gw-multichannel-gateway"}}]


# -- 4. secrets anywhere in config -----------------------------------------------------------------

PLAIN = [
    ({"channels": {"whatsapp": {"accounts": [{"phone_number_id": "2", "access_token": "EAAx"}]}}},
     "config.channels.whatsapp.accounts[0].access_token"),
    ({"channels": {"whatsapp": {"access_token": "EAAx"}}}, "config.channels.whatsapp.access_token"),
    ({"channels": {"instagram": {"verify_token": "v"}}}, "config.channels.instagram.verify_token"),
    ({"server": {"api_token": "t"}}, "config.server.api_token"),
    ({"queue": {"redis_url": "redis://:pw@r:6379/0"}}, "config.queue.redis_url"),
    ({"sinks": {"ai": {"provider": "openai", "api_key": "sk-x"}}}, "config.sinks.ai.api_key"),
    ({"sinks": {"forward": {"url": "https://x", "secret": "s"}}}, "config.sinks.forward.secret"),
    ({"sinks": {"forward": {"url": "https://x", "headers": {"Authorization": "Bearer x"}}}},
     "config.sinks.forward.headers.Authorization"),
    ({"sinks": {"forward": {"url": "https://x", "headers": {"X-Api-Key": "k"}}}},
     "config.sinks.forward.headers.X-Api-Key"),
    ({"sinks": {"crm": {"db_password": "pw"}}}, "config.sinks.crm.db_password"),
    ({"sinks": {"crm": {"client_secret": 12345}}}, "config.sinks.crm.client_secret"),
    ({"sinks": {"crm": {"token": {"env": "X", "default": "leak"}}}}, "config.sinks.crm.token"),
]


@pytest.mark.parametrize("config,path", PLAIN, ids=[p for _, p in PLAIN])
def test_a_plain_secret_anywhere_in_config_fails_naming_its_path(tmp_path, config, path):
    stderr = render_error({"config": config}, tmp_path=tmp_path)
    assert f"{path} is a secret and would be written in plain text into the ConfigMap" in stderr
    assert "put the value under `secrets`" in stderr and "existingSecret" in stderr
    assert "{env: NAME}" in stderr


def test_inside_a_list_the_message_says_references_resolve_there_too(tmp_path):
    stderr = render_error({"config": PLAIN[0][0]}, tmp_path=tmp_path)
    assert "at any depth, inside lists and nested tables too" in stderr
    stderr = render_error({"config": {"server": {"api_token": "t"}}}, tmp_path=tmp_path)
    assert "at any depth" not in stderr


def test_references_and_empty_values_render(tmp_path):
    config = {
        "channels": {"whatsapp": {
            "access_token": {"env": "MY_WA_TOKEN"}, "verify_token": "",
            "accounts": [{"phone_number_id": "2", "access_token": {"env": "WA_TOKEN_2"}}]}},
        "server": {"api_token": {"file": "/run/secrets/api-token"}},
        "sinks": {"forward": {"url": "https://x", "secret": {"env": "FWD"},
                              "headers": {"X-Tenant": "acme"}}},
    }
    docs = render({"config": config}, tmp_path=tmp_path)
    table = tomllib.loads(gateway_toml(docs))
    whatsapp = table["channels"]["whatsapp"]
    assert whatsapp["access_token"] == {"env": "MY_WA_TOKEN"}
    assert whatsapp["accounts"] == [{"phone_number_id": "2", "access_token": {"env": "WA_TOKEN_2"}}]
    assert table["server"]["api_token"] == {"file": "/run/secrets/api-token"}
    assert table["sinks"]["forward"]["headers"] == {"X-Tenant": "acme"}


def test_references_the_guard_accepts_are_ones_the_gateway_resolves(tmp_path):
    config = {"channels": {"whatsapp": {"access_token": {"env": "MY_WA_TOKEN"},
                                        "phone_number_id": "1"}},
              "sinks": {"ai": {"provider": "openai", "api_key": {"env": "MY_OPENAI_KEY"}}}}
    docs = render({"config": config}, tmp_path=tmp_path)
    run = check_config(gateway_toml(docs), tmp_path, MY_WA_TOKEN="from-env-wa",
                       MY_OPENAI_KEY="from-env-openai")
    assert run.returncode == 0, run.stderr
    assert "from-env-wa" not in run.stdout and "from-env-openai" not in run.stdout


def test_toml_keys_that_are_not_bare_are_quoted(tmp_path):
    config = {"sinks": {"forward": {"url": "https://x", "headers": {"X-Tenant Id": "a.b"}}}}
    docs = render({"config": config}, tmp_path=tmp_path)
    headers = tomllib.loads(gateway_toml(docs))["sinks"]["forward"]["headers"]
    assert headers == {"X-Tenant Id": "a.b"}


# -- 11. metrics on the http port ------------------------------------------------------------------

def test_metrics_port_equal_to_port_gives_one_port_everywhere(tmp_path):
    import kubernetes_validate

    values = {"config": {"server": {"port": 8080, "metrics_port": 8080}},
              "metrics": {"serviceMonitor": {"enabled": True}},
              "networkPolicy": {
                  "enabled": True,
                  "httpFrom": [{"namespaceSelector": {"matchLabels": {"team": "edge"}}}],
                  "metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]}}
    docs = render(values, tmp_path=tmp_path)
    by_kind = kinds(docs)
    assert container(docs)["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert [p["name"] for p in by_kind["Service"]["spec"]["ports"]] == ["http"]
    assert by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "http"
    (rule,) = by_kind["NetworkPolicy"]["spec"]["ingress"]  # both peer lists reach the one port
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "edge"}}},
                            {"namespaceSelector": {"matchLabels": {"team": "obs"}}}]
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert check_config(gateway_toml(docs), tmp_path).returncode == 0
    # either list empty (= any peer) leaves the one port open to any peer
    values["networkPolicy"]["metricsFrom"] = []
    (rule,) = kinds(render(values, tmp_path=tmp_path))["NetworkPolicy"]["spec"]["ingress"]
    assert "from" not in rule


# -- 9. NetworkPolicy egress -----------------------------------------------------------------------

EGRESS = [
    {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "redis"}}}],
     "ports": [{"port": 6379, "protocol": "TCP"}]},
    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
     "ports": [{"port": 443, "protocol": "TCP"}]},
]
DNS = {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


@pytest.mark.parametrize("network,types,egress", [
    ({}, ["Ingress"], None),
    ({"egress": EGRESS}, ["Ingress", "Egress"], [DNS, *EGRESS]),
    ({"egress": EGRESS, "allowDNS": False}, ["Ingress", "Egress"], EGRESS),
], ids=["ingress-only", "egress-with-dns", "egress-without-dns"])
def test_network_policy_egress(tmp_path, network, types, egress):
    import kubernetes_validate

    docs = render({"networkPolicy": {"enabled": True, **network}}, tmp_path=tmp_path)
    policy = kinds(docs)["NetworkPolicy"]
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    assert policy["spec"]["policyTypes"] == types
    assert policy["spec"].get("egress") == egress
    assert [r["ports"][0]["port"] for r in policy["spec"]["ingress"]] == ["http", "metrics"]


def test_extra_volumes_are_mounted(tmp_path):
    import kubernetes_validate

    values = {"extraVolumes": [{"name": "fwd", "secret": {"secretName": "forward-secret"}}],
              "extraVolumeMounts": [{"name": "fwd", "mountPath": "/run/secrets/forward",
                                     "readOnly": True}],
              "config": {"sinks": {"forward": {"url": "https://x",
                                               "secret": {"file": "/run/secrets/forward/key"}}}}}
    docs = render(values, tmp_path=tmp_path)
    deploy = kinds(docs)["Deployment"]
    kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)
    assert {"name": "fwd", "secret": {"secretName": "forward-secret"}} in \
        deploy["spec"]["template"]["spec"]["volumes"]
    assert {"name": "fwd", "mountPath": "/run/secrets/forward", "readOnly": True} in \
        container(docs)["volumeMounts"]
    assert yaml.safe_dump(docs).count("/run/secrets/forward/key") == 1  # in the TOML only
