"""Metrics (Istio's names), access logs and, later, tracing."""
