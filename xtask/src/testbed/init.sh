#!/bin/busybox sh
# /init of the vfplane testbed guest. The console (ttyS0) carries the
# kernel's messages; the script's output goes to ttyS1, which the host reads.
#
# Three ways to boot, chosen by /etc/vfplane/testbed.env:
# - VFPLANE_TESTBED_INIT=systemd: the root is the Debian image on the
#   virtio disk (/dev/vda). This init loads the disk's modules, mounts it,
#   copies the run's files (/overlay in the initramfs) onto it and hands
#   over to systemd, whose vfplane-testbed unit runs the stage.
# - VFPLANE_TESTBED_ROOT_ON_TMPFS=1: the first pass copies the initramfs
#   onto a tmpfs and makes that the root (switch_root frees the
#   initramfs): container runtimes cannot pivot_root out of an initramfs.
#   The second pass (this same file, on the new root) goes on as usual.
# - otherwise busybox runs everything from the initramfs.
if /bin/busybox grep -q '^VFPLANE_TESTBED_INIT=systemd' /etc/vfplane/testbed.env; then
  /bin/busybox --install -s /bin
  mkdir -p /proc /sys /dev /newroot
  mount -t proc proc /proc
  mount -t sysfs sysfs /sys
  mount -t devtmpfs devtmpfs /dev
  fail() { echo "testbed: $*" > /dev/ttyS1; echo "VFPLANE-TESTBED-EXIT 125" > /dev/ttyS1; poweroff -f; }
  for m in $(cat /etc/vfplane/root-modules); do
    insmod "/lib/modules/vfplane/$m" || fail "insmod $m failed"
  done
  i=0
  while [ ! -b /dev/vda ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  mount -t ext4 /dev/vda /newroot || fail "cannot mount the root disk /dev/vda"
  cp -a /overlay/. /newroot/ || fail "cannot copy the run's files onto the root disk"
  umount /proc /sys /dev
  exec switch_root /newroot /sbin/init
fi
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

. /etc/vfplane/stage.sh
