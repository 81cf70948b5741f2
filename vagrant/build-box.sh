#!/usr/bin/env bash
# Builds the Debian 12 box the Vagrantfile boots (libvirt provider, qcow2) from Debian
# packages, and `vagrant box add`s it as nodeagent/debian12: Vagrant Cloud cannot be
# reached from here. Idempotent: does nothing when the box of this recipe is added
# already; the box file is cached in $NODEAGENT_VAGRANT_CACHE (/var/cache/nodeagent/vagrant)
# so a second clone, or a `vagrant box remove`, does not rebuild it. --force rebuilds.
#
# The recipe is PLATFORM.md's: debootstrap minbase into an ext4 partition written through
# a loop device at an offset (no udev here for partition devices), ext4 without
# 64bit/metadata_csum (extlinux 6.04 cannot boot those), extlinux + mbr.bin, net.ifnames=0
# so the NIC is eth0, a vagrant user with passwordless sudo and Vagrant's insecure key.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=vagrant/host.sh
. "$HERE/host.sh"

FORCE=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-box: unknown argument $a (try --help)" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" != 0 ]; then
  echo "build-box: run as root (debootstrap, loop devices, libvirt)" >&2
  exit 1
fi

MIRROR="${NODEAGENT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DISK_GB=8
# What goes into the guest: PLATFORM.md's list, plus what the agent needs in it
# (a venv for its wheels, iptables capture, curl and iproute2 for checks).
GUEST_PKGS=(linux-image-amd64 systemd-sysv udev openssh-server sudo ifupdown
            isc-dhcp-client python3 python3-venv dbus qemu-guest-agent rsync
            iptables iproute2 curl ca-certificates netbase procps)
# The recipe's hash names the box file: a changed recipe builds a new box.
RECIPE="$(sha256sum <"$0" | cut -c1-12)"
mkdir -p "$NODEAGENT_VAGRANT_CACHE"
BOXFILE="$NODEAGENT_VAGRANT_CACHE/debian12-$RECIPE.box"
ADDED="$NODEAGENT_VAGRANT_CACHE/added"

vagrant_host_packages
# Vagrant's insecure public key, as the vagrant package ships it.
KEY="$(dpkg -L vagrant | grep '/keys/vagrant.pub$' || true)"
KEY="${KEY%%$'\n'*}"
[ -f "$KEY" ] || { echo "build-box: vagrant's insecure key not found" >&2; exit 1; }

box_listed() {
  grep -q ",box-name,$NODEAGENT_BOX\$" <<<"$(vagrant box list --machine-readable 2>/dev/null)"
}
if [ "$FORCE" = 0 ] && [ -f "$BOXFILE" ] && [ "$(cat "$ADDED" 2>/dev/null)" = "$RECIPE" ] &&
   box_listed; then
  echo "build-box: $NODEAGENT_BOX is up to date ($BOXFILE)"
  exit 0
fi

WORK="$NODEAGENT_VAGRANT_CACHE/work"
MNT="$WORK/mnt"
cleanup() {
  local m
  for m in dev/pts dev proc sys ""; do
    mountpoint -q "$MNT/$m" 2>/dev/null && umount -l "$MNT/$m"
  done
  return 0
}
trap cleanup EXIT

if [ "$FORCE" = 1 ] || [ ! -f "$BOXFILE" ]; then
  t0=$SECONDS
  echo "build-box: building $BOXFILE (debootstrap bookworm, ~5 min)"
  cleanup
  rm -rf "$WORK"
  mkdir -p "$WORK" "$MNT" "$NODEAGENT_VAGRANT_CACHE/debs"
  RAW="$WORK/disk.raw"
  truncate -s "${DISK_GB}G" "$RAW"
  # MBR: one bootable Linux partition from sector 2048 to the end (mbr.bin boots it).
  sectors=$(( DISK_GB * 1024 * 1024 * 2 - 2048 ))
  le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) \
           $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
  # shellcheck disable=SC2059
  printf "\\x80\\xfe\\xff\\xff\\x83\\xfe\\xff\\xff$(le32 2048)$(le32 $sectors)" |
    dd of="$RAW" bs=1 seek=446 conv=notrunc status=none
  printf '\x55\xaa' | dd of="$RAW" bs=1 seek=510 conv=notrunc status=none
  dd if=/usr/lib/EXTLINUX/mbr.bin of="$RAW" bs=440 count=1 conv=notrunc status=none
  mkfs.ext4 -q -F -L root -O ^64bit,^metadata_csum -E offset=1048576 "$RAW" \
    "$(( DISK_GB * 1024 - 1 ))M"
  mount -o loop,offset=1048576 "$RAW" "$MNT"

  inc="$(IFS=,; echo "${GUEST_PKGS[*]}")"
  debootstrap --variant=minbase --include="$inc" --cache-dir="$NODEAGENT_VAGRANT_CACHE/debs" \
    bookworm "$MNT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
      tail -30 "$WORK/debootstrap.log" >&2
      echo "build-box: debootstrap failed (log: $WORK/debootstrap.log)" >&2
      exit 1
    }
  echo "build-box: debootstrap done in $(( SECONDS - t0 )) s"

  # The guest's configuration.
  echo "debian12" >"$MNT/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 debian12\n' >"$MNT/etc/hosts"
  echo "/dev/vda1 / ext4 errors=remount-ro 0 1" >"$MNT/etc/fstab"
  cat >"$MNT/etc/network/interfaces" <<'NET'
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp

source /etc/network/interfaces.d/*
NET
  # Each VM gets its own machine id and SSH host key at first boot: ed25519 only, as
  # an RSA key takes a minute to make under software emulation.
  : >"$MNT/etc/machine-id"
  rm -f "$MNT"/etc/ssh/ssh_host_*
  echo "HostKey /etc/ssh/ssh_host_ed25519_key" >"$MNT/etc/ssh/sshd_config.d/hostkey.conf"
  cat >"$MNT/etc/systemd/system/ssh-host-keys.service" <<'UNIT'
[Unit]
Description=Generate SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=multi-user.target
UNIT
  ln -sf /etc/systemd/system/ssh-host-keys.service \
    "$MNT/etc/systemd/system/multi-user.target.wants/ssh-host-keys.service"
  chroot "$MNT" useradd -m -s /bin/bash -U vagrant
  echo "vagrant:vagrant" | chroot "$MNT" chpasswd
  echo "vagrant ALL=(ALL) NOPASSWD: ALL" >"$MNT/etc/sudoers.d/vagrant"
  chmod 0440 "$MNT/etc/sudoers.d/vagrant"
  install -d -m 0700 "$MNT/home/vagrant/.ssh"
  install -m 0600 "$KEY" "$MNT/home/vagrant/.ssh/authorized_keys"
  chroot "$MNT" chown -R vagrant:vagrant /home/vagrant/.ssh
  rm -rf "$MNT"/var/lib/apt/lists/* "$MNT"/var/cache/apt/*.bin "$MNT"/var/cache/apt/archives/*.deb

  # Boot: extlinux in the partition, the kernel on the serial console, eth0 names.
  kernel="$(cd "$MNT/boot" && ls vmlinuz-* | sort -V | tail -1)"
  initrd="initrd.img-${kernel#vmlinuz-}"
  [ -f "$MNT/boot/$initrd" ] || { echo "build-box: no $initrd in the guest" >&2; exit 1; }
  mkdir -p "$MNT/boot/extlinux"
  cat >"$MNT/boot/extlinux/extlinux.conf" <<CONF
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  LINUX /boot/$kernel
  INITRD /boot/$initrd
  APPEND root=/dev/vda1 rw console=ttyS0 net.ifnames=0 biosdevname=0
CONF
  extlinux --install "$MNT/boot/extlinux" >/dev/null 2>&1
  # Blocks of deleted files (debootstrap's .debs) back to holes: a smaller qcow2.
  fstrim "$MNT" || true
  sync
  cleanup

  echo "build-box: converting to qcow2"
  qemu-img convert -O qcow2 "$RAW" "$WORK/box.img"
  rm -f "$RAW"
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$DISK_GB" \
    >"$WORK/metadata.json"
  cat >"$WORK/Vagrantfile" <<'VF'
# The box's defaults: software emulation (KVM is not usable on the machine that built it).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "qemu"
  end
end
VF
  tar -C "$WORK" -cf "$BOXFILE.tmp" metadata.json Vagrantfile box.img
  mv "$BOXFILE.tmp" "$BOXFILE"
  rm -rf "$WORK"
  # Boxes of earlier recipes: 1 GB each.
  find "$NODEAGENT_VAGRANT_CACHE" -maxdepth 1 -name 'debian12-*.box' ! -path "$BOXFILE" -delete
  echo "build-box: built $BOXFILE ($(du -h "$BOXFILE" | cut -f1)) in $(( SECONDS - t0 )) s"
fi

# vagrant-libvirt copies a box into libvirt's pool once and reuses that volume: drop a
# stale copy of an earlier build so the new box is the one VMs start from.
vagrant_host_libvirt
for vol in $(virsh -c qemu:///system vol-list default 2>/dev/null |
             awk -v p="${NODEAGENT_BOX//\//-VAGRANTSLASH-}_vagrant_box_image" \
                 'index($1, p) == 1 {print $1}'); do
  virsh -c qemu:///system vol-delete --pool default "$vol" >/dev/null || true
done
vagrant box add --force --name "$NODEAGENT_BOX" "$BOXFILE" >/dev/null
echo "$RECIPE" >"$ADDED"
echo "build-box: added $NODEAGENT_BOX ($BOXFILE)"
