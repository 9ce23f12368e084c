# The vfplane demo on the emulated SR-IOV node (runs inside the guest).
set -e
pf=/sys/bus/pci/devices/0000:00:02.0
step() { echo; echo "== $*"; }

step "discovery: the node as the agent sees it"
vfplane-agent discover

step "creating 4 VFs on the PF (sriov_numvfs)"
echo 4 > $pf/sriov_numvfs
vfplane-agent discover

step "binding VF 0 to vfio-pci (driver_override + drivers_probe)"
vf=$(basename "$(readlink $pf/virtfn0)")
echo vfio-pci > /sys/bus/pci/devices/$vf/driver_override
echo "$vf" > /sys/bus/pci/drivers_probe
vfplane-agent discover
group=$(basename "$(readlink /sys/bus/pci/devices/$vf/iommu_group)")
ls -l /dev/vfio/
test -c /dev/vfio/$group
echo
echo "VF $vf is isolated in IOMMU group $group and ready for a container: /dev/vfio/$group"
