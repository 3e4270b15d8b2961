#!/usr/bin/env bash
# End-to-end on kind: the upstream Kubernetes "[sig-network] Netpol" e2e against netpol, with
# netpol the only NetworkPolicy enforcer in the cluster.
#
# What it proves: kind's default CNI (kindnet) enforces NetworkPolicy itself since kind 0.24,
# so the cluster is created without it (tests/kind/kind-config.yaml: disableDefaultCNI) and
# given the reference ptp + host-local CNI plugins (tests/kind/cni.conflist, written into each
# node with docker exec, plus the routes between nodes), which enforce nothing. Before netpol
# is installed the script checks that no other enforcer runs (no kindnet, kube-network-policies,
# Calico, Cilium, ... pods, no such nftables table on a node) and that a deny-all policy does
# NOT block a connection (tests/kind/probe.yaml); with netpol the same connection is denied.
# Then the e2e runs, and its pass count is printed. Last, `helm uninstall` (or the kustomize
# uninstall) must stop enforcement on every node: the probe connects again and no pins remain.
#
# Prerequisites (not available on the development machines, which have no Docker engine):
#   docker, kind (v0.20+), kubectl, curl, helm (`cargo xtask setup` puts one in target/tools),
#   about 8 GiB of free memory.
# Usage:
#   tests/kind/run.sh                      # install with the Helm chart
#   INSTALL=kustomize tests/kind/run.sh    # install with kubectl apply -k deploy/
#   KEEP_CLUSTER=1 tests/kind/run.sh       # keep the cluster afterwards
#   E2E_FOCUS='\[sig-network\] Netpol.*ingress' tests/kind/run.sh
#   ARTIFACTS=/tmp/netpol-e2e tests/kind/run.sh  # where logs go (default target/kind-artifacts)
# On failure the artifacts directory keeps the netpol pods' logs, every namespace's events and
# pods, the probe's results, the e2e output and report, and `kind export logs`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KIND_DIR="$ROOT/tests/kind"
CLUSTER="${CLUSTER:-netpol-e2e}"
INSTALL="${INSTALL:-helm}"
NAMESPACE=netpol-system
E2E_FOCUS="${E2E_FOCUS:-\[sig-network\] Netpol}"
# SCTP needs the sctp kernel module on the kind host; skip it unless asked for.
E2E_SKIP="${E2E_SKIP:-SCTP|\[Serial\]}"
ARTIFACTS="${ARTIFACTS:-$ROOT/target/kind-artifacts}"
# What enforces NetworkPolicy besides netpol, by pod name or image.
ENFORCERS='kindnet|kube-network-policies|calico|cilium|antrea|kube-router|weave|canal|romana|netpol-controller'

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'tests/kind/run.sh: %s\n' "$*" >&2; exit 1; }

# The chart's appVersion, the image tag the manifests use.
app_version() {
  sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$ROOT/deploy/chart/Chart.yaml"
}

# The CNI configuration of a node whose pods get addresses from CIDR.
render_cni_conflist() {
  sed "s|@POD_CIDR@|$1|" "$KIND_DIR/cni.conflist"
}

# The lines of "NAMESPACE/POD IMAGE..." (standard input) that are another enforcer.
other_enforcers() {
  grep -Ei "$ENFORCERS" || true
}

# "N passed, M failed" from ginkgo's summary line in an e2e log; fails without one.
pass_count() {
  local line passed failed
  line="$(grep -Eo '[0-9]+ Passed \| [0-9]+ Failed' "$1" | tail -n1)" || true
  [[ -n $line ]] || return 1
  passed="${line%% Passed*}"
  failed="${line#*| }"
  failed="${failed%% Failed*}"
  printf '%s passed, %s failed\n' "$passed" "$failed"
}

helm_bin() {
  if [[ -x "$ROOT/target/tools/helm" ]]; then
    printf '%s\n' "$ROOT/target/tools/helm"
  else
    command -v helm || die "missing prerequisite: helm (cargo xtask setup installs one)"
  fi
}

nodes() {
  kind get nodes --name "$CLUSTER"
}

# The ptp plugin on every node, and a route to every other node's pods (what kindnet would
# do, without its policy controller); traffic leaving the cluster is masqueraded.
install_cni() {
  local node cidr ip other ocidr oip
  for node in $(nodes); do
    docker exec "$node" test -x /opt/cni/bin/ptp -a -x /opt/cni/bin/host-local -a -x /opt/cni/bin/portmap \
      || die "$node: the kind node image lacks the ptp/host-local/portmap CNI plugins"
    cidr="$(pod_cidr "$node")"
    render_cni_conflist "$cidr" | docker exec -i "$node" sh -c 'cat >/etc/cni/net.d/10-netpol-e2e.conflist'
    docker exec "$node" iptables -t nat -A POSTROUTING -s 10.244.0.0/16 ! -d 10.244.0.0/16 -j MASQUERADE
    for other in $(nodes); do
      [[ $other == "$node" ]] && continue
      ocidr="$(pod_cidr "$other")"
      oip="$(kubectl get node "$other" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')"
      docker exec "$node" ip route replace "$ocidr" via "$oip"
    done
    ip="$(kubectl get node "$node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')"
    log "$node: pods $cidr, node $ip"
  done
  kubectl wait --for=condition=Ready nodes --all --timeout=180s
}

check_no_other_enforcer() {
  local found node
  found="$(kubectl get pods -A -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name} {range .spec.containers[*]}{.image} {end}{"\n"}{end}' | other_enforcers)"
  [[ -z $found ]] || die "another NetworkPolicy enforcer runs: $found"
  for node in $(nodes); do
    if docker exec "$node" nft list tables 2>/dev/null | grep -Ei 'network-polic|kindnet'; then
      die "$node: an nftables table of another NetworkPolicy enforcer"
    fi
  done
  log "no other NetworkPolicy enforcer"
}

# Connects the probe's client to its server: prints allowed or denied.
probe() {
  local ip
  ip="$(kubectl -n netpol-probe get pod server -o jsonpath='{.status.podIP}')"
  if kubectl -n netpol-probe exec client -- /agnhost connect "$ip:8080" --timeout=3s >/dev/null 2>&1; then
    echo allowed
  else
    echo denied
  fi
}

# The probe must give $2 within 30 s (programming a change takes a moment).
expect_probe() {
  local got try
  for try in $(seq 10); do
    got="$(probe)"
    echo "$1 (try $try): $got" >>"$ARTIFACTS/probe.txt"
    if [[ $got == "$2" ]]; then
      log "probe $1: $got (as expected)"
      return 0
    fi
    sleep 3
  done
  die "probe $1: the connection was $got, expected $2"
}

# A node's spec.podCIDR, once the controller manager has assigned it.
pod_cidr() {
  local cidr try
  for try in $(seq 60); do
    cidr="$(kubectl get node "$1" -o jsonpath='{.spec.podCIDR}')"
    if [[ -n $cidr ]]; then
      printf '%s\n' "$cidr"
      return 0
    fi
    [[ $try -lt 60 ]] && sleep 1
  done
  die "$1: no spec.podCIDR after 60 s"
}

install_netpol() {
  kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
  kubectl label namespace "$NAMESPACE" pod-security.kubernetes.io/enforce=privileged --overwrite
  # With the (optional) ClusterNetworkPolicy CRD: the daemon watches its objects.
  case "$INSTALL" in
    helm)
      "$(helm_bin)" install netpol "$ROOT/deploy/chart" --namespace "$NAMESPACE" \
        --set clusterNetworkPolicy.installCRD=true --wait --timeout 5m
      ;;
    kustomize)
      kubectl apply -k "$ROOT/deploy/crds"
      kubectl apply -k "$ROOT/deploy"
      ;;
    *) die "INSTALL=$INSTALL: helm or kustomize" ;;
  esac
  kubectl -n "$NAMESPACE" rollout status daemonset/netpol --timeout=180s
}

uninstall_netpol() {
  case "$INSTALL" in
    helm) "$(helm_bin)" uninstall netpol --namespace "$NAMESPACE" --wait --timeout 10m ;;
    kustomize)
      kubectl apply -k "$ROOT/deploy/uninstall"
      kubectl -n "$NAMESPACE" wait --for=condition=complete job/netpol-uninstall --timeout=10m
      kubectl delete -k "$ROOT/deploy/uninstall"
      kubectl delete -k "$ROOT/deploy" --ignore-not-found
      kubectl delete -k "$ROOT/deploy/crds" --ignore-not-found
      ;;
  esac
  local node
  for node in $(nodes); do
    if docker exec "$node" test -e /sys/fs/bpf/netpol; then
      die "$node: /sys/fs/bpf/netpol still holds pins after the uninstall"
    fi
  done
}

run_e2e() {
  local version work
  work="$ARTIFACTS/e2e"
  mkdir -p "$work"
  # The e2e binary matching the server version, from the Kubernetes release artifacts.
  version="$(kubectl version -o json | sed -n 's/.*"gitVersion": *"\(v[^"]*\)".*/\1/p' | tail -n1)"
  curl -sSfL "https://dl.k8s.io/${version}/kubernetes-test-linux-amd64.tar.gz" -o "$work/test.tgz"
  tar -xzf "$work/test.tgz" -C "$work" kubernetes/test/bin/e2e.test
  kind get kubeconfig --name "$CLUSTER" >"$work/kubeconfig"
  local rc=0
  "$work/kubernetes/test/bin/e2e.test" \
    --kubeconfig "$work/kubeconfig" \
    --provider local \
    --ginkgo.focus "$E2E_FOCUS" \
    --ginkgo.skip "$E2E_SKIP" \
    --ginkgo.v \
    --report-dir "$work/report" 2>&1 | tee "$ARTIFACTS/e2e.log" || rc=$?
  local count
  count="$(pass_count "$ARTIFACTS/e2e.log")" || die "no ginkgo summary in $ARTIFACTS/e2e.log"
  echo "netpol e2e ($INSTALL): $count"
  return "$rc"
}

collect_artifacts() {
  mkdir -p "$ARTIFACTS"
  kubectl get pods -A -o wide >"$ARTIFACTS/pods.txt" 2>&1 || true
  kubectl get events -A --sort-by=.lastTimestamp >"$ARTIFACTS/events.txt" 2>&1 || true
  kubectl -n "$NAMESPACE" logs daemonset/netpol --all-containers --prefix --tail=-1 >"$ARTIFACTS/netpol-daemonset.log" 2>&1 || true
  local pod
  for pod in $(kubectl -n "$NAMESPACE" get pods -o name 2>/dev/null); do
    kubectl -n "$NAMESPACE" logs "$pod" --all-containers --prefix --previous >"$ARTIFACTS/${pod#pod/}.previous.log" 2>&1 || true
    kubectl -n "$NAMESPACE" logs "$pod" --all-containers --prefix >"$ARTIFACTS/${pod#pod/}.log" 2>&1 || true
    kubectl -n "$NAMESPACE" describe "$pod" >"$ARTIFACTS/${pod#pod/}.describe.txt" 2>&1 || true
  done
  kind export logs --name "$CLUSTER" "$ARTIFACTS/kind" >/dev/null 2>&1 || true
  log "artifacts in $ARTIFACTS"
}

on_exit() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    collect_artifacts
  fi
  if [[ -z "${KEEP_CLUSTER:-}" ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}

main() {
  local tool version
  for tool in docker kind kubectl curl; do
    command -v "$tool" >/dev/null || die "missing prerequisite: $tool"
  done
  [[ $INSTALL == kustomize ]] || helm_bin >/dev/null
  mkdir -p "$ARTIFACTS"
  : >"$ARTIFACTS/probe.txt"
  version="$(app_version)"
  [[ -n $version ]] || die "no appVersion in deploy/chart/Chart.yaml"
  trap on_exit EXIT

  kind create cluster --name "$CLUSTER" --config "$KIND_DIR/kind-config.yaml"
  install_cni
  check_no_other_enforcer

  # The control: nothing enforces yet, so the deny-all policy must not block.
  kubectl apply -f "$KIND_DIR/probe.yaml"
  kubectl -n netpol-probe wait --for=condition=Ready pod/server pod/client --timeout=180s
  expect_probe "before netpol" allowed

  docker build -f "$ROOT/deploy/Dockerfile" -t "netpol:$version" "$ROOT"
  kind load docker-image --name "$CLUSTER" "netpol:$version"
  install_netpol
  check_no_other_enforcer
  expect_probe "with netpol" denied

  local rc=0
  run_e2e || rc=$?
  kubectl -n "$NAMESPACE" logs daemonset/netpol --tail=50 || true
  [[ $rc -eq 0 ]] || die "the e2e failed (exit status $rc)"

  uninstall_netpol
  expect_probe "after the uninstall" allowed
  log "done: netpol was the only enforcer, passed the e2e, and its uninstall stopped enforcement"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
