# The vfplane demo on the emulated SR-IOV node (runs inside the guest):
# the path of one VF, from desired state to packets on the wire.
pf=/sys/bus/pci/devices/0000:00:02.0
step() { echo; echo "== $*"; }
fail() { echo "demo: $*"; exit 1; }

step "1. discovery: the node as the agent sees it"
vfplane-agent discover

step "2. desired state: 4 VFs, two for userspace (pool 'fast'), two for the kernel"
cat > /tmp/state.yaml <<'Y'
spec:
  pfs:
    - pciAddress: "0000:00:02.0"
      numVfs: 4
      vfGroups:
        - resourceName: fast
          vfRange: "0-1"
          deviceType: vfio-pci
          macs: ["02:00:00:00:00:01", "02:00:00:00:00:02"]
        - resourceName: kernel
          vfRange: "2-3"
          deviceType: netdevice
          vlan: 100
Y
cat /tmp/state.yaml
mkdir -p /etc/vfplane
VFPLANE_LOG=warn vfplane-agent apply --state-file /tmp/state.yaml --status-file /tmp/status.json \
  --pool-config /etc/vfplane/pools.yaml || fail "apply did not converge"
vfplane-agent discover
echo "pool config written by the agent:"; cat /etc/vfplane/pools.yaml

step "3. the device plugin serves vfplane.io/fast; a stand-in kubelet registers it and allocates one VF"
vfplane-device-plugin --pool-config /etc/vfplane/pools.yaml > /tmp/plugin.log 2>&1 &
plugin=$!
kubelet-standin --kubelet-dir /var/lib/kubelet/device-plugins --resource vfplane.io/fast \
  --allocate 1 --ready-file /tmp/ready --stop-file /tmp/stop --timeout-secs 120 > /tmp/standin.log &
standin=$!
i=0
while [ ! -e /tmp/ready ]; do
  sleep 0.1; i=$((i+1))
  [ $i -gt 900 ] && { cat /tmp/plugin.log; fail "the stand-in never got ready"; }
done
touch /tmp/stop
wait $standin
grep -E '"event":"(registration|allocate)"' /tmp/standin.log
vf=$(grep '"event":"allocate"' /tmp/standin.log | grep -o 'PCIDEVICE_VFPLANE_IO_FAST":"[^"]*' | head -n1 | cut -d'"' -f3)
[ -n "$vf" ] || fail "no VF in the Allocate response"
echo "the container would get PCIDEVICE_VFPLANE_IO_FAST=$vf"

step "4. in the 'pod': the poll-mode driver opens $vf through VFIO and sends 2000 frames, no kernel on the path"
PCIDEVICE_VFPLANE_IO_FAST=$vf pktgen --count 2000 --size 60 --dst 02:00:00:00:00:aa || fail "pktgen failed"

kill -TERM $plugin; wait $plugin
echo
echo "The host side counts the frames that left the emulated NIC (printed below)."
