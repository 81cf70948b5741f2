"""Capture: iptables rules (rendered by pure functions, then applied), network namespaces,
and (later) BPF programs."""
