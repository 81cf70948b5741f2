"""``nodeagent dashboard``: a live service-graph page of the mesh.

Modules: ``graph`` (pure: metric samples to nodes and edges), ``agents`` (the agents'
metrics and recent requests over their node agent sockets), ``prom`` (the same samples
from a Prometheus server), ``server`` (the HTTP routes and the poller), ``cli`` (the
command), ``page.html`` (the page: inline script, style and drawings; nothing fetched
from the internet).
"""
