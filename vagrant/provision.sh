#!/usr/bin/env bash
# Run as root in each guest by `vagrant up`/`vagrant provision`: installs the agent (its
# site-packages built on the host by payload.sh and synced into /opt/nodeagent/venv), the
# unit deploy/systemd/nodeagent.service, the sample app as ratings.service, the mesh
# config (a WorkloadEntry per VM; or, joined on the host by join.sh, what `nodeagent vm
# join` wrote for this VM), the mesh link's address, and (re)starts both services.
# Arguments: NODE MESH_IP VMS MESH_PREFIX (the Vagrantfile passes them).
set -euo pipefail
NODE="$1" MESH_IP="$2" VMS="$3" PREFIX="$4"
SRC=/opt/nodeagent/src
VENV=/opt/nodeagent/venv
t0=$SECONDS
say() { echo "provision[$NODE +$(( SECONDS - t0 ))s]: $*"; }

# The mesh link (eth1): the address other VMs reach this one's workloads at.
if ! grep -q '^iface eth1' /etc/network/interfaces; then
  printf '\nauto eth1\niface eth1 inet static\n    address %s/24\n' "$MESH_IP" \
    >>/etc/network/interfaces
  ifup eth1
fi

say "installing the agent into $VENV"
# The site-packages are synced in already (payload.sh built them): the venv around them,
# and the launchers pip would write.
[ -x "$VENV/bin/python3" ] || python3 -m venv --without-pip "$VENV"
for cmd in nodeagent:nodeagent.cli nodeagent-cni:nodeagent.cni.plugin; do
  printf '#!%s\nimport sys\nfrom %s import main\nsys.exit(main())\n' \
    "$VENV/bin/python3" "${cmd#*:}" >"$VENV/bin/${cmd%%:*}"
  chmod 0755 "$VENV/bin/${cmd%%:*}"
done
ln -sf "$VENV/bin/nodeagent" /usr/local/bin/nodeagent # `sudo nodeagent ctl status`
nodeagent --version

say "writing the mesh config"
install -d -m 0755 /etc/nodeagent /etc/nodeagent/config
rm -f /etc/nodeagent/config/*.yaml
JOIN=/opt/nodeagent/join
if [ -d "$JOIN/$NODE" ]; then
  # joined on the host by `nodeagent vm join` (vagrant/join.sh): its token, the mesh's
  # root, the agent's CA options, and the mesh config with every VM's entry
  say "joining the mesh with the files of nodeagent vm join"
  install -m 0600 "$JOIN/$NODE/token" /etc/nodeagent/token
  install -m 0644 "$JOIN/$NODE/root-cert.pem" /etc/nodeagent/root-cert.pem
  install -m 0644 "$JOIN/$NODE/nodeagent.env" /etc/nodeagent/nodeagent.env
  install -m 0644 "$JOIN"/config/*.yaml /etc/nodeagent/config/
else
  install -m 0644 "$SRC/deploy/systemd/nodeagent.env" /etc/nodeagent/nodeagent.env
  bash "$SRC/vagrant/mesh-config.sh" "$VMS" "$PREFIX" --entries >/etc/nodeagent/config/vm.yaml
fi
"$VENV/bin/nodeagent" config check /etc/nodeagent/config

say "installing nodeagent.service and ratings.service"
install -m 0644 "$SRC/deploy/systemd/nodeagent.service" /etc/systemd/system/nodeagent.service
install -m 0644 "$SRC/vagrant/ratings.service" /etc/systemd/system/ratings.service
systemctl daemon-reload
systemctl enable -q ratings.service nodeagent.service
systemctl restart ratings.service nodeagent.service

# Both answer before provisioning ends (the first start compiles nothing but imports a lot
# under software emulation: tens of seconds).
wait_for() {
  local what="$1" url="$2" i
  for i in $(seq 240); do
    curl -fsS -o /dev/null --max-time 2 "$url" && { say "$what answers ($url)"; return 0; }
    sleep 1
  done
  say "$what does not answer at $url"
  journalctl -u "$3" --no-pager -n 40 || true
  return 1
}
wait_for "the agent's readiness" http://127.0.0.1:15021/healthz/ready nodeagent.service
wait_for "ratings" http://127.0.0.1:9080/healthz ratings.service
systemctl is-active nodeagent.service ratings.service
say "done"
