# The testbed guest as a Kubernetes node: networking, containerd, the
# images, kubelet, kube-proxy. Runs as the testbed script; the host kills the guest when
# the cluster stops. containerd's log goes to ttyS3, kubelet's to ttyS2.
# On the systemd node (VFPLANE_TESTBED_INIT=systemd) containerd, kubelet
# and kube-proxy are systemd units this script starts; on the busybox node
# shell loops keep them running.
set -eu
. /etc/vfplane/node.env
. /etc/vfplane/testbed.env
systemd=false
[ "$VFPLANE_TESTBED_INIT" = systemd ] && systemd=true

step() { echo "node: $* ($(cut -d' ' -f1 /proc/uptime) s after boot)"; }

mount --make-rshared /
hostname "$NODE_NAME"
echo "$NODE_NAME" > /etc/hostname
printf '127.0.0.1 localhost\n%s %s\n' "$NODE_IP" "$NODE_NAME" > /etc/hosts
: > /etc/resolv.conf
# systemd made the machine ID at boot; the busybox node has none.
$systemd || cat /proc/sys/kernel/random/uuid | tr -d '-' > /etc/machine-id

# The management NIC is the one with the host-assigned MAC.
mgmt=""
for net in /sys/class/net/*; do
  [ "$(cat "$net/address")" = "$MGMT_MAC" ] && mgmt=${net##*/}
done
[ -n "$mgmt" ] || { echo "node: no interface has MAC $MGMT_MAC"; exit 1; }
ip link set "$mgmt" up
ip addr add "$NODE_IP/24" dev "$mgmt"
ip route add default via "$GATEWAY_IP"
echo 1 > /proc/sys/net/ipv4/ip_forward
step "network up on $mgmt ($NODE_IP)"

mkdir -p /var/lib/containerd /run/containerd /var/lib/kubelet /var/log/pods /etc/cni/net.d /etc/cdi /var/run/cdi
if $systemd; then
  # systemd delegates the cgroup controllers; its units restart the
  # services whenever they exit.
  systemctl start containerd
else
  # Delegate every controller the kubelet and runc manage.
  controllers=""
  for c in $(cat /sys/fs/cgroup/cgroup.controllers); do controllers="$controllers +$c"; done
  echo "$controllers" > /sys/fs/cgroup/cgroup.subtree_control
  # Containers get the locked-memory limit a systemd node gives containerd
  # (LimitMEMLOCK 8 MiB), not the testbed's unlimited one: a poll-mode driver
  # must get more through its pool's profile.
  ulimit -l 8192
  # containerd restarts when it exits, as under a service manager (the
  # restart campaign kills it; running containers live on in their shims).
  (
    while :; do
      containerd --config /etc/containerd/config.toml > /dev/ttyS3 2>&1
      echo "node: containerd exited ($?), restarting in 1 s"
      sleep 1
    done
  ) &
fi
i=0
until ctr version > /dev/null 2>&1; do
  i=$((i + 1))
  [ "$i" -le 600 ] || { echo "node: containerd did not answer in 60 s"; exit 1; }
  sleep 0.1
done
step "containerd up"
for image in /var/lib/testbed/images/*.tar; do
  ctr -n k8s.io images import --local "$image" > /dev/null
done
step "images imported: $(ctr -n k8s.io images list -q | grep -v '^sha256:' | tr '\n' ' ')"

# Services' ClusterIPs, for pods (the kubernetes Service) and for the API
# server on the host (admission webhooks), which routes them to this node.
if $systemd; then
  systemctl start kubelet kube-proxy
  step "kubelet and kube-proxy started"
else
  # kubelet restarts when it exits, as under a service manager.
  (
    while :; do
      kubelet --config=/var/lib/kubelet/config.yaml --kubeconfig=/var/lib/kubelet/kubeconfig \
        --node-ip="$NODE_IP" --hostname-override="$NODE_NAME" --v=2 > /dev/ttyS2 2>&1
      echo "node: kubelet exited ($?), restarting in 1 s"
      sleep 1
    done
  ) &
  step "kubelet started"
  (kube-proxy --kubeconfig=/var/lib/kube-proxy/kubeconfig --proxy-mode=nftables \
    --hostname-override="$NODE_NAME" --cluster-cidr="$POD_CIDR" --conntrack-max-per-core=0 --v=1 2>&1 \
    | sed 's/^/kube-proxy: /') &
  step "kube-proxy started"
fi

if [ -f /etc/vfplane/node-extra.sh ]; then
  sh /etc/vfplane/node-extra.sh
fi
echo "VFPLANE-NODE-UP"
while :; do sleep 3600; done
