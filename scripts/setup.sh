#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine (as root) for nodeagent:
# Debian packages, the virtualenv at .venv with nodeagent installed, kernel bits.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (it installs Debian packages and makes network namespaces)" >&2
  exit 1
fi

# Debian packages: only those missing, so a second run installs nothing.
PKGS=(iproute2 iptables curl wrk haproxy nginx-light util-linux procps psmisc tcpdump
      python3 python3-venv ca-certificates
      # the CNI plugin chained after the reference plugins (bridge, host-local, loopback)
      containernetworking-plugins
      # the compiled hot path (nodeagent/native.py): mypyc's C needs a compiler and Python.h
      gcc python3-dev
      # eBPF capture: bcc (pure Python over libbcc) compiles bpf/*.c at load time
      python3-bpfcc libbpfcc bpftool linux-headers-amd64
      # the VM install's checks: `systemd-analyze verify` of deploy/systemd, `vagrant validate`
      # (the VM tier, scripts/vm-test.sh, installs the rest: libvirt, QEMU, debootstrap)
      systemd vagrant vagrant-libvirt
      # dig and nslookup: what users ask the DNS proxy with (the DNS tests do too)
      bind9-dnsutils
      # the observability tests: a real Prometheus scraping the sandbox's agents, and
      # headless Chromium driving `nodeagent dashboard` (fonts for its screenshot)
      prometheus chromium fonts-dejavu-core)
# (the image's tools, podman/buildah/mmdebstrap, are installed by build-image.sh itself)
missing=()
for p in "${PKGS[@]}"; do
  grep -q "ok installed" <<<"$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The distro starts these as services; the benchmark and the tests run their own copies.
  for svc in haproxy nginx prometheus; do
    systemctl disable --now "$svc" >/dev/null 2>&1 || service "$svc" stop >/dev/null 2>&1 || true
  done
fi

# Python: the machine's python3 (Debian's on a fresh box).
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
STAMP=.venv/.nodeagent-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "setup: installing nodeagent and its Python dependencies into .venv"
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e '.[dev]'; } >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"
    echo "setup: pip install failed (output above)" >&2
    exit 1
  fi
  rm -f "$log"
  touch "$STAMP"
fi

# The hot path compiled with mypyc (nodeagent/native.py), rebuilt when one of its modules
# changed since the last build. Without it the agent runs the same modules as pure Python.
if ! env -u NODEAGENT_PURE .venv/bin/nodeagent native status >/dev/null 2>&1; then
  echo "setup: compiling the hot path with mypyc (about a minute)"
  log=$(mktemp)
  if ! .venv/bin/nodeagent native build >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: warning: compiling failed (output above); the agent runs pure Python" >&2
  fi
  rm -f "$log"
fi

# bcc from a venv: link only Debian's bcc package (the PyPI "bcc" is something else).
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
[ -e "$SITE/bcc" ] || ln -s /usr/lib/python3/dist-packages/bcc "$SITE/bcc"
# bcc needs the running kernel's headers at /lib/modules/$(uname -r)/build. Where the
# distro has none for this kernel (a VM's custom kernel), link the newest Debian
# headers tree in its place; never touch a real modules directory.
KREL=$(uname -r)
if [ ! -e "/lib/modules/$KREL/build" ]; then
  HDR=$(ls -d /lib/modules/*-amd64 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$HDR" ] && { [ ! -e "/lib/modules/$KREL" ] || [ -L "/lib/modules/$KREL" ]; }; then
    rm -f "/lib/modules/$KREL"
    ln -s "$HDR" "/lib/modules/$KREL"
    echo "setup: no kernel headers for $KREL: bcc will use $HDR"
  else
    echo "setup: warning: no kernel headers for $KREL (eBPF capture will be unavailable)" >&2
  fi
fi

# The kernel bits the sandbox uses.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mountpoint -q /sys/fs/cgroup/unified 2>/dev/null || [ -f /sys/fs/cgroup/cgroup.controllers ] || {
  mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified; }
mkdir -p /run/nodeagent /var/run/netns
echo "setup: ready ($ROOT/.venv/bin/nodeagent)"
