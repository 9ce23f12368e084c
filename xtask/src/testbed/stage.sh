# The testbed's stage, once the system is up: every PF's link up, the VFs
# asked for made, then the script as root with its output on ttyS1 (which
# the host reads), then power off. Run by /init on the busybox node, by the
# vfplane-testbed unit on the systemd node.
out=/dev/ttyS1
. /etc/vfplane/testbed.env
if [ "$VFPLANE_TESTBED_INIT" = systemd ]; then
  export HOME=/root
  stty -F /dev/ttyS1 raw -echo 2>/dev/null
  # udev names the NICs; let it finish before their links are touched.
  udevadm settle --timeout=30
  if [ "$VFPLANE_TESTBED_KERNEL_VF_DRIVER" = 1 ]; then
    modprobe igbvf || echo "testbed: modprobe igbvf failed" > $out
  fi
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
