"""Workload identity: the mesh CA, certificate signing requests, the per-agent certificate
store with rotation, and the TLS contexts built from them."""
