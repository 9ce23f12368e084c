#!/usr/bin/env bash
# Installs what the emulated SR-IOV node needs on the host, idempotently:
# QEMU >= 8 (igb device) from bookworm-backports, busybox-static, cpio, kmod,
# xz-utils, runc and nftables (copied into the minimal guest), and mmdebstrap
# and e2fsprogs (the systemd node's root image). Only Debian's registry is used.
set -euo pipefail

need_install=0
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  need_install=1
elif ! qemu-system-x86_64 -device help 2>/dev/null | grep -q '"igb"'; then
  need_install=1
fi
for bin in busybox cpio depmod xz runc nft mmdebstrap mkfs.ext4; do
  command -v "$bin" >/dev/null 2>&1 || need_install=1
done
[ -x /bin/busybox ] || need_install=1

if [ "$need_install" = 0 ]; then
  exit 0
fi

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

# Add bookworm-backports with the same mirror and key as the main Debian entry.
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  src=$(grep -ls 'Suites: bookworm' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
  uris="http://deb.debian.org/debian"
  key="/usr/share/keyrings/debian-archive-keyring.gpg"
  if [ -n "$src" ]; then
    uris=$(awk '/^URIs:/{print $2; exit}' "$src")
    key=$(awk '/^Signed-By:/{print $2; exit}' "$src")
  fi
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
    "$uris" "$key" | $SUDO tee /etc/apt/sources.list.d/vfplane-backports.sources >/dev/null
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null
$SUDO apt-get install -y -qq busybox-static cpio kmod xz-utils runc nftables mmdebstrap e2fsprogs >/dev/null
qemu-system-x86_64 --version | head -n1
