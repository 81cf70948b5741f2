"""An upgrade of agents run with ``--workers 2`` drops nothing either: the new agent gets
the old one's listeners (``SO_REUSEPORT`` groups already), its own workers join the
groups, and only then do the old agent and its workers stop accepting and drain. The
test is ``test_upgrade``'s own, run here with this module's agent flags."""

from __future__ import annotations

from test_upgrade import test_an_upgrade_of_both_nodes_drops_no_connection

AGENT_ARGS = ("--drain-seconds", "60", "--workers", "2")

__all__ = ["test_an_upgrade_of_both_nodes_drops_no_connection"]
