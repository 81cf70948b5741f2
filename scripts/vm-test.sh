#!/usr/bin/env bash
# The VM tier: a real Debian 12 guest (vagrant/Vagrantfile, libvirt + QEMU) running the
# agent as its systemd unit and the sample app as its workload. Builds the box if it is
# missing (vagrant/build-box.sh, cached in /var/cache/nodeagent/vagrant), brings one VM up,
# joins it to a mesh CA on the host (vagrant/join.sh, `nodeagent vm join`), checks that
# nodeagent.service and ratings.service are active, that ratings answers from the host
# over the VM's network, that `nodeagent ctl` in the VM sees its WorkloadEntry, that the
# agent captures ratings.service (host mode) and holds its certificate, calling over
# mutual TLS, then destroys the VM, also when a step failed. Prints how long each step took.
# Run as root. NODEAGENT_VM_KEEP=1 leaves the VM up (then: cd vagrant && vagrant destroy -f
# with the VAGRANT_DOTFILE_PATH and NODEAGENT_VM_PREFIX this script prints).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=vagrant/host.sh
. "$ROOT/vagrant/host.sh"
if [ "$(id -u)" != 0 ]; then
  echo "vm-test: run as root (libvirt, /dev/kvm, Debian packages)" >&2
  exit 1
fi

# Its own VM names, ports and Vagrant state, so a VM someone brought up by hand in
# vagrant/ is left alone.
export NODEAGENT_VMS=1
export NODEAGENT_VM_PREFIX="nodeagent-test-"
export NODEAGENT_VM_PORT_BASE="${NODEAGENT_VM_PORT_BASE:-24300}"
export VAGRANT_DOTFILE_PATH="$NODEAGENT_VAGRANT_CACHE/vm-test.vagrant"
[ -n "${NODEAGENT_PYTHON:-}" ] || [ ! -x "$ROOT/.venv/bin/python" ] ||
  export NODEAGENT_PYTHON="$ROOT/.venv/bin/python"
# The VM joins a mesh CA on the host (vagrant/join.sh: `nodeagent vm join`), which it
# reaches at 10.0.2.2 (QEMU's user network shows the host's loopback there).
export NODEAGENT_VM_JOIN_DIR="$NODEAGENT_VAGRANT_CACHE/vm-test.join"
CA_PORT=$(( NODEAGENT_VM_PORT_BASE + 9 ))
CA_PID=""
APP_PORT=$(( NODEAGENT_VM_PORT_BASE + 10 ))
READY_PORT=$(( NODEAGENT_VM_PORT_BASE + 11 ))
VM=vm-1

TIMES=()
T_START=$SECONDS
step() {
  local name="$1" t0=$SECONDS rc=0
  shift
  echo "== vm-test: $name"
  "$@" || rc=$?
  TIMES+=("$(printf '%-34s %5d s  %s' "$name" $(( SECONDS - t0 )) "$([ $rc = 0 ] && echo ok || echo FAILED)")")
  return $rc
}
report() {
  echo "== vm-test: timings"
  printf '  %s\n' "${TIMES[@]}"
  printf '  %-34s %5d s\n' "total" $(( SECONDS - T_START ))
}
vm_created() {
  [ -d "$VAGRANT_DOTFILE_PATH" ] &&
    (cd "$ROOT/vagrant" && vagrant status "$VM" --machine-readable 2>/dev/null) |
      grep -q ",state,running\|,state,paused\|,state,shutoff\|,state,preparing"
}
destroy() {
  (cd "$ROOT/vagrant" && vagrant destroy -f "$VM" >/dev/null)
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ $rc != 0 ] && vm_created; then
    echo "== vm-test: failed; the guest's agent and workload logs:" >&2
    (cd "$ROOT/vagrant" && timeout 60 vagrant ssh "$VM" -c \
      "sudo journalctl -u nodeagent.service -u ratings.service --no-pager -n 60" 2>&1) >&2 || true
    echo "   (serial console: $NODEAGENT_VAGRANT_CACHE/$NODEAGENT_VM_PREFIX$VM.console.log)" >&2
  fi
  if [ "${NODEAGENT_VM_KEEP:-0}" = 1 ] && [ $rc = 0 ]; then
    echo "vm-test: left $VM up (VAGRANT_DOTFILE_PATH=$VAGRANT_DOTFILE_PATH" \
         "NODEAGENT_VM_PREFIX=$NODEAGENT_VM_PREFIX)"
  elif vm_created || virsh -c qemu:///system dominfo "$NODEAGENT_VM_PREFIX$VM" >/dev/null 2>&1; then
    step "vagrant destroy" destroy || {
      # Vagrant lost track of it: remove the domain and its disk directly.
      virsh -c qemu:///system destroy "$NODEAGENT_VM_PREFIX$VM" >/dev/null 2>&1 || true
      virsh -c qemu:///system undefine "$NODEAGENT_VM_PREFIX$VM" --remove-all-storage \
        >/dev/null 2>&1 || true
    }
  fi
  if [ -n "$CA_PID" ]; then kill "$CA_PID" 2>/dev/null || true; fi
  vagrant_host_kvm_restore || true
  report
  [ $rc = 0 ] && echo "vm-test: PASS" || echo "vm-test: FAIL" >&2
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_vm() { (cd "$ROOT/vagrant" && vagrant ssh "$VM" -c "$1" -- -o LogLevel=ERROR); }

check_units() {
  local out
  out="$(in_vm "systemctl is-active nodeagent.service ratings.service")"
  echo "$out"
  [ "$(echo "$out" | tr -d '\r' | grep -c '^active$')" = 2 ]
}
check_ratings_from_host() {
  local body
  body="$(curl -fsS --max-time 10 "http://127.0.0.1:$APP_PORT/from-the-host")"
  printf '%.300s\n' "$body"
  grep -Eq '"service": ?"ratings"' <<<"$body" &&
    grep -Eq '"node": ?"vm-1"' <<<"$body" &&
    curl -fsS --max-time 10 -o /dev/null "http://127.0.0.1:$READY_PORT/healthz/ready"
}
check_ctl() {
  local status services
  status="$(in_vm "sudo /opt/nodeagent/venv/bin/nodeagent ctl status")"
  echo "$status"
  services="$(in_vm "sudo /opt/nodeagent/venv/bin/nodeagent ctl services")"
  echo "$services"
  grep -q "vm-1" <<<"$status" && grep -q "192.168.121.10" <<<"$services"
}

# Host mode in the guest: ratings.service is a local workload the agent captures by its
# cgroup. A process put in that cgroup asks for `ratings` by name: the agent's DNS proxy
# answers the Service's address (nothing listens there) and the capture takes the
# connection to the agent, which sends it to the workload's address; the app sees it come
# from there. Outside the cgroup (this SSH session) nothing is captured: the same name
# does not resolve.
check_host_mode() {
  local rules workloads body outside
  workloads="$(in_vm "sudo /opt/nodeagent/venv/bin/nodeagent ctl workloads")"
  echo "$workloads"
  rules="$(in_vm "sudo iptables-save -t nat")"
  echo "$rules" | grep NODEAGENT_HOST
  body="$(in_vm "sudo sh -c 'echo \$\$ > /sys/fs/cgroup/system.slice/ratings.service/cgroup.procs &&
    exec curl -fsS --max-time 10 http://ratings.default.svc.cluster.local:9080/in-the-mesh'")"
  printf '%.300s\n' "$body"
  outside="$(in_vm "getent hosts ratings.default.svc.cluster.local || echo unresolved")"
  echo "outside the workload's cgroup: $outside"
  echo "$workloads" | grep -E 'ratings-vm-1 +WorkloadEntry +vm-1 +192\.168\.121\.10 +yes +ready' &&
    grep -q -- '--path "/system.slice/ratings.service"' <<<"$rules" &&
    grep -q -- '-d 192.168.121.10/32 -p tcp -m multiport --dports 9080' <<<"$rules" &&
    grep -Eq '"client": ?"192\.168\.121\.10:' <<<"$body" &&
    grep -q unresolved <<<"$outside"
}

ca_up() {
  local nodeagent="${NODEAGENT_PYTHON:-$ROOT/.venv/bin/python}"
  nodeagent="$(dirname "$nodeagent")/nodeagent"
  NODEAGENT="$nodeagent" bash "$ROOT/vagrant/join.sh" "$NODEAGENT_VM_JOIN_DIR" \
    "$NODEAGENT_VMS" 192.168.121 "$CA_PORT"
  "$nodeagent" ca serve --dir "$NODEAGENT_VM_JOIN_DIR/ca" --listen "127.0.0.1:$CA_PORT" \
    --tls-name 10.0.2.2 --config "$NODEAGENT_VM_JOIN_DIR/config" \
    --tokens "$NODEAGENT_VM_JOIN_DIR/tokens.json" \
    >"$NODEAGENT_VAGRANT_CACHE/vm-test.ca.log" 2>&1 &
  CA_PID=$!
  local i
  for i in $(seq 50); do
    grep -q "listening" "$NODEAGENT_VAGRANT_CACHE/vm-test.ca.log" && return 0
    kill -0 "$CA_PID" 2>/dev/null || break
    sleep 0.2
  done
  cat "$NODEAGENT_VAGRANT_CACHE/vm-test.ca.log" >&2
  return 1
}
# The joined VM holds its workload's certificate, signed by the host's CA, and its call
# above went over HBONE with mutual TLS (the agent's metrics say from which identity).
check_mtls() {
  local certs metrics
  certs="$(in_vm "sudo /opt/nodeagent/venv/bin/nodeagent ctl certs")"
  echo "$certs"
  metrics="$(in_vm "curl -fsS --max-time 5 http://127.0.0.1:15020/metrics")"
  grep -m3 '^istio_tcp_connections_opened_total{' <<<"$metrics"
  grep -q "spiffe://cluster.local/ns/default/sa/ratings" <<<"$certs" &&
    awk '/^istio_tcp_connections_opened_total\{/ && /mutual_tls/ &&
      /source_principal="spiffe:\/\/cluster.local\/ns\/default\/sa\/ratings"/ { f = 1 }
      END { exit !f }' <<<"$metrics"
}

step "host packages" vagrant_host_packages
step "libvirt daemons" vagrant_host_libvirt
vagrant_host_kvm_open
step "box (build-box.sh)" bash "$ROOT/vagrant/build-box.sh"
if vm_created; then step "destroy a leftover VM" destroy; fi
step "mesh CA on the host, VM joined (join.sh)" ca_up
step "vagrant up (boot + provision)" \
  bash -c "cd '$ROOT/vagrant' && vagrant up '$VM' --provider libvirt --no-tty"
step "units active (systemctl)" check_units
step "ratings from the host" check_ratings_from_host
step "nodeagent ctl in the VM" check_ctl
step "host mode: ratings.service captured" check_host_mode
step "joined: certificate, mutual TLS" check_mtls
