"""``python -m nodeagent.workers FD BUCKETS``: a worker process, started by the main
process with its end of the channel as descriptor ``FD`` and the node's token buckets
as ``BUCKETS`` (not a command for people)."""

from __future__ import annotations

import sys

from nodeagent.workers.child import main

if __name__ == "__main__":
    if len(sys.argv) != 3 or not all(a.isdigit() for a in sys.argv[1:]):
        print(
            "usage: python -m nodeagent.workers FD BUCKETS (started by nodeagent run)",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
