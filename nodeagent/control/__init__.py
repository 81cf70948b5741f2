"""Config sources: files (and later Kubernetes). Parse and validate off the hot path, then
publish a new ``MeshSnapshot`` with one assignment."""
