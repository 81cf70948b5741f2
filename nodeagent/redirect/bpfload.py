"""The one-shot eBPF loader: compile ``bpf/capture.c`` with bcc, load every program, pin
them beside the maps, and exit.

The agent runs it as a child process (``python -m nodeagent.redirect.bpfload PIN_DIR
SRC``, see ``ebpf.load_programs``) when this version's programs are not pinned yet, so
that bcc's LLVM and clang (about 90 MiB mapped) and the compile's heap (about as much
again) go away with it; the agent itself only opens pinned objects through libbpf.

What it leaves under ``PIN_DIR``: the maps at ``maps-<abi>/<map>`` (pinned by bcc from the
C file's ``BPF_TABLE_PINNED``; reopened when they are there already, as on a restart of an
agent before this loader) and every program at ``maps-<abi>/progs/<key>`` (``ebpf.PROGS``),
pinned under a temporary name first and renamed into place, so that a ``progs``
directory is always complete. Two loaders racing (an agent and its successor) leave the
first one's programs. Exit status 0 when the programs are pinned; 1 with ``cannot load
...`` on stderr when bcc or the verifier refuse them (e.g. a missing capability).
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from nodeagent.redirect.ebpf import PROGS, PROGS_DIR, abi_of, cflags, progs_pinned
from nodeagent.redirect.libbpf import obj_pin


def load_and_pin(pin_dir: str, src: Path) -> bool:
    """Compile ``src``, load its programs and pin them under ``maps-<abi>/progs``; False
    when another loader pinned them first (or they were there already)."""
    maps = os.path.join(pin_dir, f"maps-{abi_of(src)}")
    if progs_pinned(maps):
        return False
    os.makedirs(maps, exist_ok=True)
    from bcc import BPF  # only here: this process exits once the programs are pinned

    bpf: Any = BPF(src_file=str(src).encode(), cflags=cflags(maps))
    tmp = os.path.join(maps, f"{PROGS_DIR}_{os.getpid()}")  # the agent removes it on a timeout
    os.makedirs(tmp)
    try:
        for key, p in PROGS.items():
            fn = bpf.load_func(p.func, p.prog_type, attach_type=p.attach_type)
            obj_pin(fn.fd, os.path.join(tmp, key))
        try:
            os.rename(tmp, os.path.join(maps, PROGS_DIR))
        except OSError as e:  # another loader won the race: its programs are as good
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            return False
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m nodeagent.redirect.bpfload PIN_DIR SOURCE", file=sys.stderr)
        return 2
    pin_dir, src = argv[0], Path(argv[1])
    try:
        load_and_pin(pin_dir, src)
    except ImportError as e:
        print(f"cannot load {src}: bcc is not importable ({e})", file=sys.stderr)
        return 1
    except Exception as e:  # bcc raises Exception for compile and verifier errors
        print(f"cannot load {src}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
