"""The chart's documentation stays true: values comments, the chart README's values table, the
README's and docs/kubernetes.md's YAML examples, the prometheus-adapter rule."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.helm.chart import CHART, HELM, ROOT, helm, kinds, render

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="helm is not installed (make install)")

VALUES = CHART / "values.yaml"
CHART_README = CHART / "README.md"
YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)
EXAMPLE_HEADER = re.compile(r"^# (helm/multichannel-gateway/examples/[\w.-]+\.yaml)\n")


def section(markdown: str, heading: str) -> str:
    start = markdown.index(f"\n{heading}\n")
    end = markdown.find("\n## ", start + len(heading) + 2)
    return markdown[start:end if end != -1 else None]


def uncommented_keys(text: str) -> list[str]:
    """Keys (sections and leaves) with no comment of their own: on the key's line after the
    value, or on the line just above it at the key's indentation."""
    lines = text.splitlines()

    def has_comment(line_no: int, column: int) -> bool:
        code, quote = [], None
        for ch in lines[line_no]:
            if quote:
                quote = None if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            else:
                code.append(ch)
        if " #" in "".join(code):
            return True
        above = lines[line_no - 1] if line_no else ""
        return above.strip().startswith("#") and len(above) - len(above.lstrip()) == column

    missing = []

    def walk(node: yaml.MappingNode, prefix: str) -> None:
        for key, value in node.value:
            name = f"{prefix}{key.value}"
            if not has_comment(key.start_mark.line, key.start_mark.column):
                missing.append(name)
            if isinstance(value, yaml.MappingNode) and not value.flow_style:
                walk(value, name + ".")

    walk(yaml.compose(text), "")
    return missing


def test_every_value_has_a_comment_of_its_own():
    assert uncommented_keys(VALUES.read_text()) == []


def test_the_comment_check_finds_uncommented_keys():
    text = ("# -- a\na: 1\n# -- b\nb:\n  c: 2  # -- c\n  d: '#not a comment'\n"
            "# -- e, not f's\ne:\n  f:\n    # -- g\n    g: true\n")
    assert uncommented_keys(text) == ["b.d", "e.f"]


def readme_table() -> dict[str, str]:
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \| .+ \|$", CHART_README.read_text(), re.M)
    assert rows, "no values table in the chart README"
    return dict(rows)


def lookup(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} is not a value of the chart"
        node = node[part]
    return node


def test_the_chart_readme_lists_every_top_level_value():
    values = yaml.safe_load(VALUES.read_text())
    table = readme_table()
    for key in values:
        assert any(row == key or row.startswith(key + ".") for row in table), key


def test_the_chart_readme_table_is_true():
    """Every row names a real value and its real default."""
    values = yaml.safe_load(VALUES.read_text())
    for key, default in readme_table().items():
        assert yaml.safe_load(default) == lookup(values, key), key


def test_helm_show_readme_prints_the_chart_readme():
    shown = helm("show", "readme", str(CHART)).stdout
    assert "## Values" in shown and "SQLite journal (default)" in shown and "## Secrets" in shown


def example_blocks(markdown: str) -> list[tuple[str, str]]:
    found = []
    for block in YAML_BLOCK.findall(markdown):
        header = EXAMPLE_HEADER.match(block)
        if header:
            found.append((header.group(1), block))
    return found


def test_readme_deploy_section_embeds_the_examples_and_they_render(tmp_path):
    text = section((ROOT / "README.md").read_text(), "## Deploy on Kubernetes")
    blocks = example_blocks(text)
    assert [name for name, _ in blocks] == ["helm/multichannel-gateway/examples/minimal.yaml",
                                            "helm/multichannel-gateway/examples/scaled-out.yaml"]
    assert len(YAML_BLOCK.findall(text)) == len(blocks)  # every YAML block is one of them
    for name, block in blocks:
        assert yaml.safe_load(block) == yaml.safe_load((ROOT / name).read_text()), name
        path = tmp_path / name.rsplit("/", 1)[1]
        path.write_text(block)
        docs = render(path)
        assert {"Deployment", "Service", "ConfigMap"} <= set(kinds(docs))
    assert "bitnami/redis" in text and "architecture: replication" in text


def test_docs_examples_are_the_example_files():
    blocks = example_blocks((ROOT / "docs" / "kubernetes.md").read_text())
    assert blocks
    for name, block in blocks:
        assert yaml.safe_load(block) == yaml.safe_load((ROOT / name).read_text()), name


def test_docs_hpa_metric_and_adapter_rule_match_the_chart():
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    text = section(guide, "## Autoscaling on the journal backlog")
    blocks = [yaml.safe_load(b) for b in YAML_BLOCK.findall(text)]
    (metric,) = [b[0] for b in blocks if isinstance(b, list)]
    (adapter,) = [b for b in blocks if isinstance(b, dict) and "rules" in b]
    hpa = kinds(render(CHART / "examples" / "scaled-out.yaml"))["HorizontalPodAutoscaler"]
    assert metric in hpa["spec"]["metrics"]
    (rule,) = adapter["rules"]["external"]
    selector = metric["external"]["metric"]["selector"]["matchLabels"]
    name = metric["external"]["metric"]["name"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
    for label in selector:  # the HPA's labels exist on the series the rule discovers
        assert f"{label}=" in rule["seriesQuery"] or f"{label}!=" in rule["seriesQuery"]
    # one value per release however many pods report the shared backlog: max, never sum
    assert rule["metricsQuery"].startswith("max(") and "sum" not in rule["metricsQuery"]
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
