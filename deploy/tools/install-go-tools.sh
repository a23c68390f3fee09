#!/usr/bin/env bash
# Build the chart-checking tools from their Go modules into the user cache, outside the work tree:
#   <cache>/go-bin/helm          helm.sh/helm/v3 (v3.21.4)
#   <cache>/go-bin/kubeconform   github.com/yannh/kubeconform (v0.7.0)
#   <cache>/crds/...             the Prometheus Operator's ServiceMonitor CRD, from its Go module,
#                                so that rendered ServiceMonitors are validated too
# where <cache> is ${XDG_CACHE_HOME:-$HOME/.cache}/calm-stream. Idempotent: what is already there at
# the pinned version is skipped, so a second run takes a second. tests/helm/helm_render.py looks there.
#
# (No CALM_STREAM_* variable here: the program refuses unknown variables with that prefix.)
set -euo pipefail

HELM_MODULE="helm.sh/helm/v3/cmd/helm"
HELM_VERSION="v3.21.4"
KUBECONFORM_MODULE="github.com/yannh/kubeconform/cmd/kubeconform"
KUBECONFORM_VERSION="v0.7.0"
PROMETHEUS_OPERATOR_MODULE="github.com/prometheus-operator/prometheus-operator"
PROMETHEUS_OPERATOR_VERSION="v0.85.0"
SERVICEMONITOR_CRD="example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/calm-stream"
GO_BIN="$CACHE/go-bin"
CRD_DIR="$CACHE/crds/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION"

# Go from PATH, else where the official tarball installs it.
GO="$(command -v go || true)"
GO="${GO:-/usr/local/go/bin/go}"
if [[ ! -x "$GO" ]]; then
  echo "install-go-tools: the go command (1.22+) is needed to build helm and kubeconform" >&2
  exit 1
fi
mkdir -p "$GO_BIN" "$CRD_DIR"

# A stamp per tool records the version that built it, so that a version bump rebuilds.
install_tool() {
  local name="$1" module="$2" version="$3"
  local stamp="$GO_BIN/.$name.version"
  if [[ -x "$GO_BIN/$name" && -f "$stamp" && "$(cat "$stamp")" == "$version" ]]; then
    echo "install-go-tools: $name $version already in $GO_BIN"
    return
  fi
  echo "install-go-tools: building $name $version into $GO_BIN (a few minutes, once)"
  # nice: the build shares a small machine with whatever else runs.
  GOBIN="$GO_BIN" CGO_ENABLED=0 nice -n 10 "$GO" install -trimpath "$module@$version"
  echo "$version" >"$stamp"
}

install_crd() {
  local target="$CRD_DIR/$(basename "$SERVICEMONITOR_CRD")"
  if [[ -s "$target" ]]; then
    echo "install-go-tools: ServiceMonitor CRD $PROMETHEUS_OPERATOR_VERSION already in $CRD_DIR"
    return
  fi
  local dir
  dir="$("$GO" mod download -json "$PROMETHEUS_OPERATOR_MODULE@$PROMETHEUS_OPERATOR_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  if [[ -z "$dir" || ! -f "$dir/$SERVICEMONITOR_CRD" ]]; then
    echo "install-go-tools: no $SERVICEMONITOR_CRD in $PROMETHEUS_OPERATOR_MODULE@$PROMETHEUS_OPERATOR_VERSION" >&2
    exit 1
  fi
  cp "$dir/$SERVICEMONITOR_CRD" "$target.tmp" && mv "$target.tmp" "$target"
  echo "install-go-tools: ServiceMonitor CRD $PROMETHEUS_OPERATOR_VERSION copied to $CRD_DIR"
}

install_tool helm "$HELM_MODULE" "$HELM_VERSION"
install_tool kubeconform "$KUBECONFORM_MODULE" "$KUBECONFORM_VERSION"
install_crd
