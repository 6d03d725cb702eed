"""Imported by the local executor's forkserver only (`CpuPool`'s preload), never elsewhere:
the server ignores SIGTERM.

Stopped with its group (systemd, `timeout`), the server died at once, and every pool worker
with it (each follows the server: `workers.guard.die_with`), killed midway through a result
being sent or with its download left. Ignoring SIGTERM, it lives on until its driver ends (it
exits when the driver's end of its pipe closes), and its workers, which take SIGTERM
themselves (`pipeline.pool_worker.stop_on_signals`), stop as forked ones do.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
