#!/usr/bin/env bash
# Lints the Dockerfiles (hadolint) and the Helm chart, renders it with default values and with every optional
# feature on, validates the manifests offline (kubernetes-validate, strict),
# checks the alert rules with promtool and parses the Grafana dashboard.
# (That every metric the dashboard and rules query exists in the gateway's
# real /metrics is a cargo test: tests/chart_metrics.rs.)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.tools/bin:$PATH"
CHART=helm/fusion-gateway
OUT=target/chart
mkdir -p "$OUT"
for tool in helm kubernetes-validate promtool hadolint; do
  command -v "$tool" >/dev/null || { echo "check-deploy: $tool is missing (run scripts/install-tools.sh)" >&2; exit 1; }
done

hadolint Dockerfile Dockerfile.cuda
helm lint --strict "$CHART"
helm lint --strict "$CHART" -f "$CHART/ci/all-features-values.yaml"
helm template fusion "$CHART" > "$OUT/default.yaml"
helm template fusion "$CHART" -f "$CHART/ci/all-features-values.yaml" > "$OUT/all-features.yaml"
# A value of the wrong type must be refused by values.schema.json.
if helm template fusion "$CHART" --set replicaCount=zero >/dev/null 2>&1; then
  echo "check-chart: values.schema.json accepted replicaCount=zero" >&2; exit 1
fi
kubernetes-validate --strict --quiet -k 1.35.0 "$OUT/default.yaml" "$OUT/all-features.yaml"

python3 - "$OUT" <<'PY'
import json, sys, yaml
out = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(f"{out}/all-features.yaml")) if d]
kinds = {d["kind"] for d in docs}
need = {"Deployment", "Service", "Ingress", "ConfigMap", "Secret", "PersistentVolumeClaim",
        "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule"}
missing = need - kinds
assert not missing, f"all-features render lacks {missing}"
rule = next(d for d in docs if d["kind"] == "PrometheusRule")
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(f"{out}/rules.yaml", "w"))
sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
assert sm["spec"]["endpoints"][0]["path"] == "/metrics", "ServiceMonitor must scrape /metrics"
dash_cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
assert dash_cm["metadata"]["labels"].get("grafana_dashboard") == "1"
dash = json.loads(dash_cm["data"]["fusion-gateway.json"])
assert dash["panels"] and all(p["targets"] for p in dash["panels"]), "every panel queries something"
dep = next(d for d in docs if d["kind"] == "Deployment")
c = dep["spec"]["template"]["spec"]["containers"][0]
assert c["securityContext"]["readOnlyRootFilesystem"] is True
assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
ing = next(d for d in docs if d["kind"] == "Ingress")
assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_merge_spec"
print(f"check-chart: {len(docs)} manifests, {len(dash['panels'])} dashboard panels, "
      f"{sum(len(g['rules']) for g in rule['spec']['groups'])} alert rules")
PY
promtool check rules "$OUT/rules.yaml"
echo "check-deploy: ok"
