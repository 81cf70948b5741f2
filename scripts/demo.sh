#!/usr/bin/env bash
# Sets everything up (idempotently) and starts the sandbox mesh with the bookinfo sample
# app on two nodes, then shows a request travelling through the mesh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
NA=.venv/bin/nodeagent
$NA sandbox down >/dev/null 2>&1 || true
$NA sandbox up "${1:-examples/bookinfo}"
$NA sandbox status
echo
echo "\$ nodeagent sandbox exec sleep -- curl -s http://productpage:9080/"
PAGE="$($NA sandbox exec sleep -- curl -s http://productpage:9080/)"
head -n 30 <<<"$PAGE"; echo "  ..."
echo
echo "\$ nodeagent ctl --node node1 status"
$NA ctl --node node1 status
echo
echo "\$ nodeagent ctl --node node2 services"
$NA ctl --node node2 services
echo
echo "The mesh is up. Try: $NA sandbox exec sleep -- curl -s http://reviews:9080/"
echo "                     $NA ctl --node node2 services"
echo "Stop it with:        $NA sandbox down"
