#!/usr/bin/env bash
# Regenerate the Python modules of the node agent socket from nodeagent/admin/nodeagent.proto.
# The generated gRPC module imports its messages as a top-level module; rewrite that to a
# package import so it works from an installed nodeagent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m grpc_tools.protoc -I nodeagent/admin \
  --python_out=nodeagent/admin --pyi_out=nodeagent/admin --grpc_python_out=nodeagent/admin \
  nodeagent/admin/nodeagent.proto
sed -i 's/^import nodeagent_pb2 as /from nodeagent.admin import nodeagent_pb2 as /' \
  nodeagent/admin/nodeagent_pb2_grpc.py
grep -q '^from nodeagent.admin import nodeagent_pb2 as ' nodeagent/admin/nodeagent_pb2_grpc.py || {
  echo "gen-proto: could not rewrite the nodeagent_pb2 import in nodeagent_pb2_grpc.py" >&2
  exit 1
}
echo "gen-proto: regenerated nodeagent/admin/nodeagent_pb2{,_grpc}.py and nodeagent_pb2.pyi"
