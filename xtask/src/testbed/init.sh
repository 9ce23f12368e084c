#!/bin/busybox sh
# /init of the vfplane testbed guest. The console (ttyS0) carries the
# kernel's messages; the script's output goes to ttyS1, which the host reads.
# With VFPLANE_TESTBED_ROOT_ON_TMPFS=1, the first pass copies the initramfs
# onto a tmpfs and makes that the root (switch_root frees the initramfs):
# container runtimes cannot pivot_root out of an initramfs. The second pass
# (this same file, on the new root) goes on as usual.
if [ -z "$VFPLANE_ROOT_MOVED" ] && /bin/busybox grep -q '^VFPLANE_TESTBED_ROOT_ON_TMPFS=1' /etc/vfplane/testbed.env; then
  /bin/busybox mkdir -p /newroot
  /bin/busybox mount -t tmpfs -o size=80%,mode=755 tmpfs /newroot
  for entry in /*; do
    case $entry in /newroot|/proc|/sys|/dev) continue ;; esac
    /bin/busybox cp -a "$entry" /newroot/
  done
  /bin/busybox mkdir -p /newroot/proc /newroot/sys /newroot/dev
  export VFPLANE_ROOT_MOVED=1
  exec /bin/busybox switch_root /newroot /init
fi
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root
mkdir -p /proc /sys /dev /tmp /run /root /var/run/cdi
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
stty -F /dev/ttyS1 raw -echo 2>/dev/null

out=/dev/ttyS1
. /etc/vfplane/testbed.env

for m in $(cat /etc/vfplane/boot-modules); do
  insmod "/lib/modules/vfplane/$m" || echo "testbed: insmod $m failed" > $out
done
if [ "$VFPLANE_TESTBED_KERNEL_VF_DRIVER" = 1 ]; then
  for m in $(cat /etc/vfplane/optional-modules); do
    insmod "/lib/modules/vfplane/$m" || echo "testbed: insmod $m failed" > $out
  done
else
  # Without the kernel VF driver loaded, new VFs stay unbound.
  :
fi
if [ "$VFPLANE_TESTBED_NODE_MODULES" = 1 ]; then
  for m in $(cat /etc/vfplane/node-modules); do
    insmod "/lib/modules/vfplane/$m" || echo "testbed: insmod $m failed" > $out
  done
fi

ip link set lo up
# Every PF's interface up: the VF data path needs the PF's RX/TX enabled.
for pf in /sys/bus/pci/devices/*; do
  [ -f "$pf/sriov_totalvfs" ] || continue
  for net in "$pf"/net/*; do
    [ -e "$net" ] || continue
    ip link set "${net##*/}" up
    # The link comes up after auto-negotiation; scripts start with carrier.
    i=0
    while [ "$(cat "$net/carrier" 2>/dev/null)" != 1 ] && [ "$i" -lt 100 ]; do
      sleep 0.1; i=$((i + 1))
    done
    [ "$i" -lt 100 ] || echo "testbed: ${net##*/} has no carrier after 10 s" > $out
  done
  if [ "${VFPLANE_TESTBED_VFS:-0}" -gt 0 ]; then
    echo "$VFPLANE_TESTBED_VFS" > "$pf/sriov_numvfs" || echo "testbed: cannot make $VFPLANE_TESTBED_VFS VFs on ${pf##*/}" > $out
  fi
done
ulimit -l unlimited

echo "VFPLANE-TESTBED-START" > $out
cd /root
sh /etc/vfplane/script < /dev/null > $out 2>&1
rc=$?
echo "VFPLANE-TESTBED-EXIT $rc" > $out
sync
poweroff -f
