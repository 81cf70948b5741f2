"""Entry point for ``python -m nodeagent``."""

from nodeagent.cli import main

raise SystemExit(main())
