"""The workloads of the examples and tests, not part of the mesh: what it carries traffic for.

Modules:

- ``sampleapp``: ``nodeagent sample-app``, the HTTP service (and TCP echo) of every example pod;
- ``samplegrpc``: its gRPC echo service (``sample.proto``), client helpers and a client CLI;
- ``common``: what both of those share (settings, the served counter, the log line);
- ``jwtmint``: ``nodeagent jwt``, signing keys and tokens for trying RequestAuthentication.

Import the submodules directly: this package imports nothing, so plain HTTP runs of the
sample app do not load gRPC.
"""
