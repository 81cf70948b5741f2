#!/usr/bin/env bash
# Build the nodeagent image (deploy/daemonset/Containerfile) with podman or buildah.
#
#   deploy/daemonset/build-image.sh [TAG]        # default TAG: localhost/nodeagent:dev
#
# Idempotent: layers are cached, so a second run with no source change takes seconds.
# The Debian 12 base comes from $BASE when set (e.g. debian:bookworm-slim where an image
# registry is reachable); otherwise it is made once from Debian's package archive with
# mmdebstrap (apt-get install mmdebstrap) and kept as localhost/nodeagent-base:bookworm.
# Set REBUILD_BASE=1 to remake it (to take Debian's updates).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TAG="${1:-localhost/nodeagent:dev}"
BASE_TAG=localhost/nodeagent-base:bookworm

# Its tools, installed when missing (as root on Debian): podman (or buildah) and mmdebstrap.
need=()
command -v podman >/dev/null || command -v buildah >/dev/null || need+=(podman)
[ -n "${BASE:-}" ] || command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  printf 'build-image: installing %s\n' "${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if command -v podman >/dev/null; then
  BUILD=(podman build --layers) EXISTS=(podman image exists) IMPORT=(podman import)
elif command -v buildah >/dev/null; then
  BUILD=(buildah build --layers) EXISTS=(buildah inspect --type image) IMPORT=()
else
  echo "build-image: needs podman or buildah (apt-get install podman)" >&2
  exit 1
fi

step() { printf 'build-image: %s\n' "$*" >&2; }
t0=$SECONDS

if [ -z "${BASE:-}" ]; then
  BASE=$BASE_TAG
  if [ -n "${REBUILD_BASE:-}" ] || ! "${EXISTS[@]}" "$BASE" >/dev/null 2>&1; then
    if ! command -v mmdebstrap >/dev/null; then
      echo "build-image: no base image $BASE: install mmdebstrap, or set BASE to a Debian 12 image" >&2
      exit 1
    fi
    step "making the Debian 12 base $BASE with mmdebstrap (no docs, no man pages)"
    # No mirror named: mmdebstrap's default for a stable suite, with its updates and security.
    tar=$(mktemp --suffix=.tar)
    trap 'rm -f "$tar"' EXIT
    mmdebstrap --quiet --variant=minbase --include=ca-certificates \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      bookworm "$tar"
    if [ ${#IMPORT[@]} -gt 0 ]; then
      "${IMPORT[@]}" --change 'CMD ["/bin/bash"]' "$tar" "$BASE" >/dev/null
    else
      ctr=$(buildah from scratch)
      mnt=$(buildah mount "$ctr")
      tar -C "$mnt" -xf "$tar"
      buildah umount "$ctr" >/dev/null
      buildah config --cmd /bin/bash "$ctr"
      buildah commit -q "$ctr" "$BASE" >/dev/null
      buildah rm "$ctr" >/dev/null
    fi
    rm -f "$tar"
    step "base made in $((SECONDS - t0)) s"
  fi
fi

# The context is only what the image needs, never a checkout's .venv or compiled modules.
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
tar -C "$ROOT" --exclude=__pycache__ --exclude='*.so' --exclude='*.egg-info' \
  -cf - pyproject.toml README.md bpf nodeagent | tar -C "$ctx" -xf -

t1=$SECONDS
step "building $TAG from $BASE"
# chroot isolation: the RUN steps (apt, pip, gcc) need no container runtime, cgroups or
# network namespace, so the build works where an OCI runtime cannot start (a hybrid cgroup
# host, a build inside a container); they use the host's network.
# pip in the build trusts what this host trusts (PIP_CERT, else the system bundle).
secret=()
bundle="${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}"
[ -s "$bundle" ] && secret=(--secret "id=ca-bundle,src=$bundle")
args=(--isolation chroot "${secret[@]}" --build-arg "BASE=$BASE"
      -f "$ROOT/deploy/daemonset/Containerfile")
# The build stage gets a tag of its own: untagged, `podman image prune` would drop it and
# with it the cache of the slow part (pip, mypyc, gcc).
"${BUILD[@]}" "${args[@]}" --target build -t localhost/nodeagent-build:cache "$ctx"
"${BUILD[@]}" "${args[@]}" -t "$TAG" "$ctx"
step "built $TAG in $((SECONDS - t1)) s ($((SECONDS - t0)) s in all)"
