#!/usr/bin/env bash
# Run on the host (scripts/vm-test.sh does): a mesh CA for the VMs and each VM joined to
# it with `nodeagent vm join`, as an operator joins VMs to a mesh.
#   DIR/ca/            the CA (`nodeagent ca init`): its root in trust-bundle.pem
#   DIR/config/        the mesh config (mesh-config.sh: Nodes, WorkloadGroup ratings,
#                      Service ratings) and, by `vm join --apply`, each VM's WorkloadEntry
#   DIR/tokens.json    the CA's per-node bootstrap tokens (0600), one per joined VM
#   DIR/vm-N/          what vm-N needs: token, root-cert.pem, nodeagent.env (the
#                      Vagrantfile syncs DIR into the guests at /opt/nodeagent/join)
# Then serve the CA where the guests reach it (QEMU's user network shows the host's
# loopback to a guest as 10.0.2.2):
#   nodeagent ca serve --dir DIR/ca --listen 127.0.0.1:PORT --tls-name 10.0.2.2 \
#     --config DIR/config --tokens DIR/tokens.json
# Usage: join.sh DIR VMS MESH_PREFIX CA_PORT
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
DIR="$1" VMS="$2" PREFIX="$3" CA_PORT="$4"
NODEAGENT="${NODEAGENT:-$ROOT/.venv/bin/nodeagent}"
rm -rf "$DIR"
mkdir -p "$DIR/config"
"$NODEAGENT" ca init --dir "$DIR/ca" >/dev/null
bash "$HERE/mesh-config.sh" "$VMS" "$PREFIX" >"$DIR/config/vm.yaml"
(umask 077 && echo '{}' >"$DIR/tokens.json")
for n in $(seq 1 "$VMS"); do
  "$NODEAGENT" vm join --config "$DIR/config" --group ratings -n default \
    --name "vm-$n" --address "$PREFIX.$(( 9 + n ))" \
    --ca-tokens "$DIR/tokens.json" --trust-bundle "$DIR/ca/trust-bundle.pem" \
    --ca-address "10.0.2.2:$CA_PORT" --ca-server-name 10.0.2.2 \
    -o "$DIR/vm-$n" --apply
done
