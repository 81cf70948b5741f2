"""``python -m nodeagent.cni``: the CNI plugin (what the ``nodeagent-cni`` launcher runs)."""

import sys

from nodeagent.cni.plugin import main

sys.exit(main())
