"""The CNI plugin ``nodeagent-cni`` and its installer, as istio-cni does it for Istio.

A container runtime execs the plugin, chained after the cluster's own network plugins,
for each pod sandbox; the plugin tells the node agent over its node agent socket, and
nothing else: it imports the admin client, never the agent's inner layers. Modules:

- ``spec``: the CNI protocol (environment, network config, results, errors), pure;
- ``plugin``: the plugin's commands (ADD, DEL, CHECK, VERSION, STATUS, GC);
- ``install``: ``nodeagent cni install``, which writes the plugin and its conflist entry.

``python -m nodeagent.cni`` runs the plugin (as does the ``nodeagent-cni`` console script).
"""
