#!/usr/bin/env bash
# Builds the cluster's Go binaries from their Go modules, pinned, into a cache
# outside the work tree keyed by version. Only the Go module proxy is used.
#
#   cluster/build-go-binaries.sh CACHE_DIR COMPONENT...
#
# COMPONENT is one of: kubernetes etcd containerd cni helm. Each lands in
# CACHE_DIR/<component>-<version>/bin, written to a temporary directory and
# renamed when complete, so an interrupted build leaves no half cache.
set -euo pipefail

KUBERNETES_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
CONTAINERD_VERSION=v2.2.9
CNI_PLUGINS_VERSION=v1.9.0
HELM_VERSION=v4.3.2
KUBERNETES_COMMANDS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"
# A fixed build date keeps the binaries reproducible; `kubectl version` reports it.
BUILD_DATE=2026-01-01T00:00:00Z

cache=${1:?usage: build-go-binaries.sh CACHE_DIR COMPONENT...}
shift
mkdir -p "$cache"
# Go may be installed without being on PATH (e.g. /usr/local/go).
command -v go >/dev/null 2>&1 || export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null 2>&1 || { echo "build-go-binaries: go is not installed (Go 1.26 is needed)" >&2; exit 1; }
export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false -trimpath" GOTOOLCHAIN=local

log() { printf 'build-go-binaries: %s\n' "$*" >&2; }

# wrapper DIR MODULE VERSION: a throwaway module that requires MODULE@VERSION.
wrapper() {
  local dir=$1 module=$2 version=$3
  rm -rf "$dir" && mkdir -p "$dir"
  printf 'module vfplane.invalid/build\n\ngo 1.26\n\nrequire %s %s\n' "$module" "$version" >"$dir/go.mod"
}

# cached COMPONENT-VERSION BINARY...: true when every binary is cached.
cached() {
  local name=$1 bin
  shift
  for bin in "$@"; do
    [ -x "$cache/$name/bin/$bin" ] || return 1
  done
}

# finish COMPONENT-VERSION TMPDIR: rename the finished bin dir into place.
finish() {
  local name=$1 tmp=$2
  rm -rf "$cache/$name"
  mv "$tmp" "$cache/$name"
  log "$name: done"
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION name=kubernetes-$KUBERNETES_VERSION
  cached "$name" $KUBERNETES_COMMANDS && return 0
  local dir=$cache/src/$name tmp=$cache/.$name.tmp
  wrapper "$dir" k8s.io/kubernetes "$v"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces
  # them with ./staging paths, which do not apply to a dependency. Each is
  # published as v0.<minor>.<patch>: replace every one the module requires.
  local gomod minor patch
  gomod=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  [ -f "$gomod" ] || { log "kubernetes: go.mod of k8s.io/kubernetes@$v not found"; return 1; }
  minor=$(echo "$v" | cut -d. -f2)
  patch=$(echo "$v" | cut -d. -f3)
  grep -oE '^[[:space:]]*k8s\.io/[a-z0-9-]+ v0\.0\.0' "$gomod" | awk '{print $1}' | sort -u | while read -r m; do
    printf 'replace %s v0.0.0 => %s v0.%s.%s\n' "$m" "$m" "$minor" "$patch"
  done >>"$dir/go.mod"
  local pkg=k8s.io/component-base/version cgo=k8s.io/client-go/pkg/version ld="-s -w"
  for p in $pkg $cgo; do
    ld="$ld -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=$BUILD_DATE"
  done
  rm -rf "$tmp" && mkdir -p "$tmp/bin"
  for cmd in $KUBERNETES_COMMANDS; do
    log "kubernetes $v: $cmd"
    (cd "$dir" && go build -ldflags "$ld" -o "$tmp/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd")
  done
  finish "$name" "$tmp"
}

build_etcd() {
  local v=$ETCD_VERSION name=etcd-$ETCD_VERSION
  cached "$name" etcd && return 0
  local dir=$cache/src/$name tmp=$cache/.$name.tmp
  wrapper "$dir" go.etcd.io/etcd/server/v3 "$v"
  rm -rf "$tmp" && mkdir -p "$tmp/bin"
  log "etcd $v"
  (cd "$dir" && go build -ldflags "-s -w" -o "$tmp/bin/etcd" go.etcd.io/etcd/server/v3)
  finish "$name" "$tmp"
}

build_containerd() {
  local v=$CONTAINERD_VERSION name=containerd-$CONTAINERD_VERSION
  cached "$name" containerd containerd-shim-runc-v2 ctr && return 0
  local dir=$cache/src/$name tmp=$cache/.$name.tmp
  wrapper "$dir" github.com/containerd/containerd/v2 "$v"
  rm -rf "$tmp" && mkdir -p "$tmp/bin"
  local ld="-s -w -X github.com/containerd/containerd/v2/version.Version=$v"
  local tags="no_btrfs no_devmapper no_zfs no_aufs netgo osusergo"
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    log "containerd $v: $cmd"
    (cd "$dir" && go build -tags "$tags" -ldflags "$ld" -o "$tmp/bin/$cmd" "github.com/containerd/containerd/v2/cmd/$cmd")
  done
  finish "$name" "$tmp"
}

build_cni() {
  local v=$CNI_PLUGINS_VERSION name=cni-plugins-$CNI_PLUGINS_VERSION
  cached "$name" bridge loopback host-local && return 0
  local dir=$cache/src/$name tmp=$cache/.$name.tmp
  wrapper "$dir" github.com/containernetworking/plugins "$v"
  rm -rf "$tmp" && mkdir -p "$tmp/bin"
  for p in main/bridge main/loopback ipam/host-local; do
    log "cni plugins $v: $p"
    (cd "$dir" && go build -ldflags "-s -w" -o "$tmp/bin/$(basename "$p")" "github.com/containernetworking/plugins/plugins/$p")
  done
  finish "$name" "$tmp"
}

build_helm() {
  local v=$HELM_VERSION name=helm-$HELM_VERSION
  cached "$name" helm && return 0
  local dir=$cache/src/$name tmp=$cache/.$name.tmp
  wrapper "$dir" helm.sh/helm/v4 "$v"
  rm -rf "$tmp" && mkdir -p "$tmp/bin"
  log "helm $v"
  # Without the -X, `helm version` says v4.0+unreleased.
  (cd "$dir" && go build -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$v" -o "$tmp/bin/helm" helm.sh/helm/v4/cmd/helm)
  finish "$name" "$tmp"
}

for component in "$@"; do
  case $component in
    kubernetes) build_kubernetes ;;
    etcd) build_etcd ;;
    containerd) build_containerd ;;
    cni) build_cni ;;
    helm) build_helm ;;
    *) log "unknown component '$component' (kubernetes, etcd, containerd, cni, helm)"; exit 2 ;;
  esac
done
