#!/usr/bin/env bash
# End-to-end on kind: build the image, deploy netpol as a DaemonSet, run the upstream
# Kubernetes "[sig-network] Netpol" conformance e2e against it.
#
# Prerequisites (not available on the development machines, which have no Docker engine):
#   docker, kind (v0.20+), kubectl, curl, and about 8 GiB of free memory.
# Usage:
#   tests/kind/run.sh                # create cluster, deploy, run the Netpol e2e, delete cluster
#   KEEP_CLUSTER=1 tests/kind/run.sh # keep the cluster afterwards
#   E2E_FOCUS='\[sig-network\] Netpol.*ingress' tests/kind/run.sh
set -euo pipefail

CLUSTER="${CLUSTER:-netpol-e2e}"
IMAGE="${IMAGE:-netpol:dev}"
E2E_FOCUS="${E2E_FOCUS:-\[sig-network\] Netpol}"
# SCTP needs the sctp kernel module on the kind host; skip it unless asked for.
E2E_SKIP="${E2E_SKIP:-SCTP|\[Serial\]}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$(mktemp -d)"

cleanup() {
  if [[ -z "${KEEP_CLUSTER:-}" ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

for tool in docker kind kubectl curl; do
  command -v "$tool" >/dev/null || { echo "missing prerequisite: $tool" >&2; exit 2; }
done

cat >"$WORK/kind.yaml" <<KIND
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
KIND

kind create cluster --name "$CLUSTER" --config "$WORK/kind.yaml" --wait 120s
docker build -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "$ROOT"
kind load docker-image --name "$CLUSTER" "$IMAGE"
kubectl apply -k "$ROOT/deploy"
kubectl -n netpol-system rollout status daemonset/netpol --timeout=180s

# The e2e binary matching the server version, from the Kubernetes release artifacts.
VERSION="$(kubectl version -o json | sed -n 's/.*"gitVersion": *"\(v[^"]*\)".*/\1/p' | tail -n1)"
curl -sSfL "https://dl.k8s.io/${VERSION}/kubernetes-test-linux-amd64.tar.gz" -o "$WORK/test.tgz"
tar -xzf "$WORK/test.tgz" -C "$WORK" kubernetes/test/bin/e2e.test kubernetes/test/bin/ginkgo

kind get kubeconfig --name "$CLUSTER" >"$WORK/kubeconfig"
"$WORK/kubernetes/test/bin/e2e.test" \
  --kubeconfig "$WORK/kubeconfig" \
  --provider local \
  --ginkgo.focus "$E2E_FOCUS" \
  --ginkgo.skip "$E2E_SKIP" \
  --ginkgo.v \
  --report-dir "$WORK/report"

kubectl -n netpol-system logs daemonset/netpol --tail=50 || true
