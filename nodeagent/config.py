"""Agent settings: one frozen dataclass, loaded and validated once at start."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AgentSettings:
    node: str
    config_dir: Path
    pods_file: Path | None = None
    netns: str = ""
    """Network namespace the agent enters at start (the node's); empty: stay."""
    socket_path: str = ""
    state_dir: Path = Path("/var/lib/nodeagent")
    redirect: str = "iptables"
    log_level: str = "info"
    connect_timeout: float = 5.0
    reload_interval: float = 0.5
    metrics_port: int = 15020
    ready_port: int = 15021
    drain_seconds: float = 5.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentSettings:
        node = args.node
        return cls(
            node=node,
            config_dir=Path(args.config).resolve(),
            pods_file=Path(args.pods).resolve() if args.pods else None,
            netns=args.netns,
            socket_path=args.socket or f"/run/nodeagent/{node}.sock",
            state_dir=Path(args.state_dir) if args.state_dir else Path("/var/lib/nodeagent"),
            redirect=args.redirect,
            log_level=args.log_level,
        )
