#!/usr/bin/env bash
# Prints the mesh config the VMs of the Vagrantfile share (provision.sh writes it to
# /etc/nodeagent/config/vm.yaml in each): per VM vm-N a Node; the WorkloadGroup ratings
# the VMs join from (their workload: the unit ratings.service, nodeagent.io/cgroup, host
# mode); the Service ratings selecting them all; and, with --entries, the WorkloadEntry of
# each VM's workload, ratings-vm-N at PREFIX.(9+N), annotated nodeagent.io/node: vm-N so
# the agent run with --node vm-N serves it (without: `nodeagent vm join` writes them, see
# join.sh).
# Usage: mesh-config.sh VMS PREFIX [--entries]
set -euo pipefail
VMS="$1" PREFIX="$2" ENTRIES="${3:-}"
echo "# Written by vagrant/provision.sh: the VMs of vagrant/Vagrantfile and their workloads."
for n in $(seq 1 "$VMS"); do
  cat <<YAML
---
apiVersion: v1
kind: Node
metadata: {name: vm-$n}
YAML
  [ "$ENTRIES" = --entries ] || continue
  cat <<YAML
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: ratings-vm-$n
  namespace: default
  annotations: {nodeagent.io/node: vm-$n, nodeagent.io/cgroup: ratings.service}
spec:
  address: $PREFIX.$(( 9 + n ))
  labels: {app: ratings, version: vm}
  serviceAccount: ratings
  ports: {http: 9080}
YAML
done
cat <<'YAML'
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: ratings, namespace: default}
spec:
  metadata:
    labels: {app: ratings, version: vm}
    annotations: {nodeagent.io/cgroup: ratings.service}
  template:
    serviceAccount: ratings
    ports: {http: 9080}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  selector: {app: ratings}
  clusterIP: 10.96.8.10
  ports:
  - {name: http, port: 9080}
YAML
