"""Helpers shared by the chart tests: run the official helm binary, render, pick objects."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
_FILES = itertools.count()
REDIS = {"config": {"queue": {"backend": "redis"}}, "redis": {"url": "redis://redis:6379/0"}}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert run.returncode == 0, run.stderr
    return run


def values_files(values, tmp_path: Path | None) -> list[str]:
    args = []
    for v in values:
        if isinstance(v, dict):
            assert tmp_path is not None, "dict values need tmp_path"
            path = tmp_path / f"values-{next(_FILES)}.yaml"
            path.write_text(yaml.safe_dump(v))
            v = path
        args += ["-f", str(v)]
    return args


def render(*values: Path | dict, tmp_path: Path | None = None, kube_version: str | None = None,
           chart: Path = CHART) -> list[dict]:
    args = ["template", "gw", str(chart), "--namespace", "messaging",
            *values_files(values, tmp_path)]
    if kube_version:
        args += ["--kube-version", kube_version]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def render_error(*values: Path | dict, tmp_path: Path) -> str:
    """helm template must fail; its error output."""
    run = helm("template", "gw", str(CHART), *values_files(values, tmp_path), check=False)
    assert run.returncode != 0, f"rendered, but should have failed:\n{run.stdout[:2000]}"
    return run.stderr


def kinds(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


def gateway_toml(docs: list[dict]) -> str:
    (config,) = [d for d in docs
                 if d["kind"] == "ConfigMap" and "gateway.toml" in d.get("data", {})]
    return config["data"]["gateway.toml"]


def container(docs: list[dict]) -> dict:
    (found,) = kinds(docs)["Deployment"]["spec"]["template"]["spec"]["containers"]
    return found


def notes(tmp_path: Path, *values: Path | dict) -> str:
    """NOTES.txt as helm install prints it. helm install --dry-run still asks a cluster for its
    version: render it through a copy of the chart with one more template that includes it."""
    chart = tmp_path / "chart"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        (chart / "templates" / "zz-notes.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
            '    {{- include (print $.Template.BasePath "/NOTES.txt") . | nindent 4 }}\n')
    run = helm("template", "gw", str(chart), *values_files(values, tmp_path),
               "--show-only", "templates/zz-notes.yaml")
    return yaml.safe_load(run.stdout)["data"]["notes"]


def check_config(text: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``gateway check-config`` on a rendered gateway.toml, with the chart's secrets as env."""
    path = tmp_path / f"gateway-{next(_FILES)}.toml"
    path.write_text(text)
    environ = {k: v for k, v in os.environ.items() if "SECRET" not in k and "TOKEN" not in k}
    environ.update(SECRETS, GATEWAY_REDIS_URL="redis://127.0.0.1:6379/0", **env)
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, env=environ)
