#!/usr/bin/env bash
# Regenerate the Python modules of our gRPC services:
#   nodeagent/admin/nodeagent.proto  the node agent socket (nodeagent.v1.NodeAgent)
#   nodeagent/identity/ca.proto      the mesh CA (istio.v1.auth.IstioCertificateService)
#   nodeagent/samples/sample.proto   the sample app's echo service (nodeagent.sample.Echo)
# The generated gRPC modules import their messages as top-level modules; rewrite that to a
# package import so they work from an installed nodeagent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-.venv/bin/python}"

# gen DIR NAME: generate DIR/NAME_pb2.py, DIR/NAME_pb2.pyi, DIR/NAME_pb2_grpc.py from
# DIR/NAME.proto and fix the message import of NAME_pb2_grpc.py.
gen() {
  local dir="$1" name="$2" pkg
  pkg="$(echo "$dir" | tr / .)"
  "$PY" -m grpc_tools.protoc -I "$dir" \
    --python_out="$dir" --pyi_out="$dir" --grpc_python_out="$dir" \
    "$dir/$name.proto"
  sed -i "s/^import ${name}_pb2 as /from ${pkg} import ${name}_pb2 as /" "$dir/${name}_pb2_grpc.py"
  grep -q "^from ${pkg} import ${name}_pb2 as " "$dir/${name}_pb2_grpc.py" || {
    echo "gen-proto: could not rewrite the ${name}_pb2 import in ${name}_pb2_grpc.py" >&2
    exit 1
  }
  echo "gen-proto: regenerated $dir/${name}_pb2{,_grpc}.py and ${name}_pb2.pyi"
}

# mark_generated FILE...: generated code is not ours to lint or type-check; say so in the
# file itself (pyproject.toml only excludes the admin modules by name).
mark_generated() {
  local f
  for f in "$@"; do
    if ! grep -q '^# ruff: noqa' <<<"$(head -n 3 "$f")"; then
      sed -i '1i # ruff: noqa\n# mypy: ignore-errors' "$f"
    fi
  done
}

gen nodeagent/admin nodeagent
gen nodeagent/identity ca
gen nodeagent/samples sample
# (mypy still reads the types of the .pyi files; it only stops reporting errors inside.)
for stem in nodeagent/identity/ca nodeagent/samples/sample; do
  mark_generated "${stem}_pb2.py" "${stem}_pb2.pyi" "${stem}_pb2_grpc.py"
  "$PY" -m ruff format --quiet "${stem}_pb2.py" "${stem}_pb2.pyi" "${stem}_pb2_grpc.py"
done
