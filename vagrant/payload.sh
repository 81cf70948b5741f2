#!/usr/bin/env bash
# Run on the host by the Vagrantfile's trigger before `vagrant up`/`provision`: builds the
# agent's wheel from this checkout, and installs it with its dependencies' wheels into
# vagrant/.payload/site-packages, byte-compiled, which the Vagrantfile syncs into the
# guests' venv (/opt/nodeagent/venv). pip in a guest under software emulation takes
# minutes to unpack and compile the same files; the guests run Debian 12's CPython 3.11
# on x86_64, the same bytecode and wheel tags as the project's venv. Dependency wheels
# are cached with the box, outside the clone.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
# shellcheck source=vagrant/host.sh
. "$HERE/host.sh"
# The project's venv has pip, setuptools (its dev extra) and the index settings.
PY="${NODEAGENT_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || { echo "payload: no $PY: run scripts/setup.sh (or set NODEAGENT_PYTHON)" >&2; exit 1; }
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null || {
  echo "payload: $PY is not Python 3.11, the guests' (Debian 12)" >&2; exit 1; }
OUT="$HERE/.payload"
DEPS="$NODEAGENT_VAGRANT_CACHE/wheels"
mkdir -p "$OUT" "$DEPS"
# One build at a time (`vagrant up` runs this trigger for each VM, in parallel), and none
# when the sources are those of the last build.
exec 9>"$OUT/.lock"
flock 9
sources() {
  tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude=vagrant --exclude=bench \
      --exclude=__pycache__ --exclude='*.so' --exclude=_native.sources.json --exclude=build \
      --exclude='*.egg-info' \
      --sort=name -cf - .
}
stamp="$(sources | sha256sum | cut -c1-16)"
if [ -d "$OUT/site-packages" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "payload: $OUT/site-packages is up to date"
  exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
pip() {
  if ! "$PY" -m pip --disable-pip-version-check -q "$@" >"$TMP/pip.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$TMP/pip.log" >&2
    echo "payload: pip $1 failed (output above)" >&2
    exit 1
  fi
}
# Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
mkdir "$TMP/src"
sources | tar -C "$TMP/src" -xf -
pip wheel --no-build-isolation --no-deps -w "$TMP/wheel" "$TMP/src"
wheel="$(ls "$TMP"/wheel/nodeagent-*.whl)"
pip wheel --only-binary=:all: -w "$DEPS" "$wheel"
rm -f "$DEPS"/nodeagent-*.whl
pip install --no-index --find-links "$DEPS" --target "$TMP/site" "$wheel"
# The guest writes its own launchers (these name the host's interpreter).
rm -rf "$TMP/site/bin"
rm -rf "$OUT/site-packages"
mv "$TMP/site" "$OUT/site-packages"
echo "$stamp" >"$OUT/stamp"
echo "payload: nodeagent and $(ls "$DEPS" | wc -l) dependencies in $OUT/site-packages" \
     "($(du -sh "$OUT/site-packages" | cut -f1))"
