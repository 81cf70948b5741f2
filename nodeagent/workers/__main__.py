"""``python -m nodeagent.workers FD``: a worker process, started by the main process
with its end of the channel as descriptor ``FD`` (not a command for people)."""

from __future__ import annotations

import sys

from nodeagent.workers.child import main

if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        print("usage: python -m nodeagent.workers FD (started by nodeagent run)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(int(sys.argv[1])))
