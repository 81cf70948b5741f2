# Sourced by vagrant/build-box.sh and scripts/vm-test.sh: what the host needs to run
# Debian guests with vagrant-libvirt (see PLATFORM.md's VM section), idempotently.
# shellcheck shell=bash

# Where the box and its build inputs are cached: outside any clone, shared by clones.
NODEAGENT_VAGRANT_CACHE="${NODEAGENT_VAGRANT_CACHE:-/var/cache/nodeagent/vagrant}"
NODEAGENT_BOX="${NODEAGENT_BOX:-nodeagent/debian12}"
# Debian packages: building the box (debootstrap, extlinux, qemu-img) and running it.
VAGRANT_HOST_PKGS=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients
                   qemu-system-x86 qemu-utils debootstrap extlinux e2fsprogs rsync
                   openssh-client curl)

vagrant_host_packages() {
  local missing=() p
  for p in "${VAGRANT_HOST_PKGS[@]}"; do
    grep -q "ok installed" <<<"$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "vagrant: installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

# libvirt's daemons: started by hand where no systemd runs them (this box), else left
# to the service manager. Both daemonize; they are left running for the next run.
vagrant_host_libvirt() {
  if virsh -c qemu:///system version >/dev/null 2>&1; then return 0; fi
  if [ -d /run/systemd/system ]; then
    systemctl start virtlogd.socket libvirtd.service
  else
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
  fi
  local i
  for i in $(seq 50); do
    virsh -c qemu:///system version >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "vagrant: libvirtd does not answer on qemu:///system" >&2
  return 1
}

# KVM: a stock guest kernel dies under -enable-kvm inside a Firecracker VM, so guests run
# on QEMU's TCG; but libvirt re-probes /dev/kvm on every define (51 s each) unless it can
# open it: group kvm, mode 0660 while VMs are defined. Restored by vagrant_host_kvm_restore.
VAGRANT_KVM_SAVED=""
vagrant_host_kvm_open() {
  [ -c /dev/kvm ] || return 0
  VAGRANT_KVM_SAVED="$(stat -c '%U:%G %a' /dev/kvm)"
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
}
vagrant_host_kvm_restore() {
  [ -n "$VAGRANT_KVM_SAVED" ] || return 0
  chown "${VAGRANT_KVM_SAVED% *}" /dev/kvm && chmod "${VAGRANT_KVM_SAVED#* }" /dev/kvm
  VAGRANT_KVM_SAVED=""
}
