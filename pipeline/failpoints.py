"""Named points where a crash test kills the process (`VIDLENS_FAILPOINT`).

The tests of recovery (tests/test_incremental.py, tests/test_store.py) run a command in a new
process and kill it between two writes, to check that the next command finishes or undoes
what it left. Unset, a failpoint costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

_FAILPOINT_HITS: Counter = Counter()


def failpoint(name: str) -> None:
    """Kill this process (SIGKILL) at a named point when VIDLENS_FAILPOINT says so (crash tests).

    VIDLENS_FAILPOINT=<name>:<n> kills at the n-th time the point is reached; points are
    "locked" (the lock is held), "video" (a video finished), "staged" (a batch's files
    written), "committed" (its manifest written) and "moving" (a batch's first file moved
    into place). <name>:<n>:pause sleeps there instead, until the process is killed.
    """
    spec = os.environ.get("VIDLENS_FAILPOINT")
    if not spec:
        return
    wanted, _, rest = spec.partition(":")
    count, _, action = rest.partition(":")
    if wanted != name:
        return
    _FAILPOINT_HITS[name] += 1
    if _FAILPOINT_HITS[name] >= int(count or 1):
        while action == "pause":
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)
