"""The lines Ray relays to the driver's console from its workers' stdout and stderr.

Ray's log monitor on each node reads its workers' output files and publishes their new lines; the
driver's `print_logs` thread hands each batch (one worker's lines, with its pid, node ip and task or
actor name) to the handlers of `ray._private.ray_logging.global_worker_stdstream_dispatcher`, where
Ray's own ("ray_print_logs") prints them after the worker's name. Ray has no public hook there
(`ray.init(log_to_driver=False)` drops every line, the workers' warnings too), so `collapse_crash_traces`
wraps that handler, and leaves Ray as it is where a Ray release no longer has it.

Ray's errors for the driver come another way: its `listen_error_messages` thread polls the cluster's
error channel and prints each through `ray._private.worker.print_to_stdstream`, which
`collapse_raylet_deaths` wraps in the same way for the note a node's agents publish as its raylet dies.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import Counter
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Ray's handler that prints the relayed lines (`ray._private.worker.connect`)
_RAY_HANDLER = "ray_print_logs"
#: a fatal check of Ray's C++ core whose status is an I/O error: the worker's connection to its
#: node's raylet broke, as when the raylet is killed with its node while the worker waits on it
_CRASH = re.compile(r"Check failed: (?P<check>.*Status not OK: IOError: .*?)\s*$")
#: Ray's note that a node's raylet died other than by SIGTERM (`ray._private.process_watcher.
#: report_raylet_error_logs`), followed by the last 20 lines of its log: each of the node's agents (the
#: dashboard's, the runtime environments') publishes it to the drivers as it finds the raylet gone
_RAYLET_DIED = re.compile(r"^Raylet is terminated\. Termination is unexpected\.")
#: the pid in a line of a raylet's log ("[2026-12-07 19:54:36,368 I 30089 30089] (raylet) ..."): the raylet's
_LOGGED_PID = re.compile(r"^\s*\[\d{4}-\d\d-\d\d [\d:,.]+ \w (\d+) \d+\]", re.MULTILINE)
#: what Ray's C++ core prints after such a check: its stack, frame by frame, and the signal's report
_TRACE = re.compile(r"^(?:\*\*\* .*|PC: @ .*|\s+@\s+0x.*|\S+\(\S*\) \[0x[0-9a-f]+\].*|\s*)$")


class _Wrapped:
    """A printer of Ray's wrapped: what it is handed rewritten (`rewritten`), then passed on; it notes when
    it was last handed something (`settle`)."""

    def __init__(self, wrapped: Callable[..., Any]) -> None:
        self.wrapped = wrapped
        self.last = time.monotonic()

    def __call__(self, data: dict, *args: Any, **kwargs: Any) -> None:
        self.last = time.monotonic()
        try:
            data = self.rewritten(data)
        except Exception:  # noqa: BLE001 - printed as Ray would rather than lost
            pass
        self.wrapped(data, *args, **kwargs)  # (left without lines it prints nothing, but Ray's deduplication goes on)

    def rewritten(self, data: dict) -> dict:
        raise NotImplementedError


class _Collapsing(_Wrapped):
    """Ray's handler of relayed lines, the crash trace of a worker whose raylet went away cut to one
    warning (`collapse_crash_traces`)."""

    def __init__(self, handler: Callable[[dict], Any]) -> None:
        super().__init__(handler)
        self.crashed: set[tuple[Any, Any]] = set()  # (ip, pid) of the workers whose trace is being left out

    def rewritten(self, data: dict) -> dict:
        """`data` without the lines of a crash trace, each trace said in one warning instead (all
        of it with -v)."""
        if logging.getLogger().isEnabledFor(logging.INFO):
            return data
        source, kept = (data.get("ip"), data.get("pid")), []
        for line in data.get("lines", []):
            crash = _CRASH.search(line)
            if crash:
                self.crashed.add(source)
                worker = data.get("actor_name") or data.get("task_name") or "a Ray worker"
                log.warning("%s (pid %s, node %s) ended as its node's raylet went away: Check failed: %s "
                            "(-v shows Ray's stack trace)", worker, data.get("pid"), data.get("ip"), crash["check"])
            elif source in self.crashed and _TRACE.match(line):
                continue  # (a trace relayed over several batches: its worker is gone, so it prints nothing else)
            else:
                self.crashed.discard(source)
                kept.append(line)
        return dict(data, lines=kept)


class _RayletDeaths(_Wrapped):
    """Ray's printer of the errors it sends the driver, its note of a node's raylet gone cut to one warning
    a node (`collapse_raylet_deaths`)."""

    def __init__(self, printer: Callable[..., Any]) -> None:
        super().__init__(printer)
        # the notes already warned of, whole: a node's agents send the same one; not the raylet's pid, which
        # two nodes share where each runs in a fresh pid namespace (a container each), or a node restarted in one
        self.said: set[str] = set()

    def rewritten(self, data: dict) -> dict:
        return dict(data, lines=[]) if self.said_instead(data) else data

    def said_instead(self, data: dict) -> bool:
        """Whether `data` is Ray's note of a raylet terminated unexpectedly, said in one warning instead (the
        first of a node's notes; the others nothing); never with -v, which prints them as Ray does."""
        lines = data.get("lines") or []
        if logging.getLogger().isEnabledFor(logging.INFO) or data.get("pid") != "raylet" or len(lines) != 1 \
                or not _RAYLET_DIED.match(lines[0]):
            return False
        if lines[0] not in self.said:
            self.said.add(lines[0])
            pids = Counter(_LOGGED_PID.findall(lines[0])).most_common(1)
            raylet = pids[0][0] if pids else None
            log.warning("a Ray node's raylet%s was terminated unexpectedly (killed, or out of memory): the node is "
                        "lost, and what ran there runs again elsewhere (-v shows Ray's note with the last lines of "
                        "its log; the node's Ray logs, raylet.out, have all of them)",
                        f" (pid {raylet})" if raylet else "")
        return True


def collapse_raylet_deaths() -> None:
    """Once Ray is connected: the note of ~23 lines that Ray prints twice for each node whose raylet was
    killed ("Raylet is terminated. Termination is unexpected. ... Last 20 lines of the Raylet logs:" and
    those lines, once from each of the node's agents) printed as one warning naming the raylet's pid; `-v`
    prints them as Ray does. Ray's other errors for the driver (a node marked dead, an actor's death) are
    printed as Ray prints them, and all of them where this Ray prints its errors otherwise."""
    try:
        import ray._private.worker as ray_worker

        printer, listener = ray_worker.print_to_stdstream, ray_worker.listen_error_messages
    except (ImportError, AttributeError):
        return
    # (the listener looks the printer up as it prints each error: where it no longer does, nothing is wrapped)
    if "print_to_stdstream" in getattr(getattr(listener, "__code__", None), "co_names", ()) \
            and not isinstance(printer, _RayletDeaths):
        ray_worker.print_to_stdstream = _RayletDeaths(printer)


def collapse_crash_traces() -> None:
    """Once Ray is connected: the ~60 lines of C++ stack a worker prints when it finds its node's raylet
    gone (a node killed with its workers: "Check failed: raylet_ipc_client_->NotifyWorkerBlocked() Status
    not OK: IOError: Broken pipe", or NotifyWorkerUnblocked) printed as one warning naming the worker, its
    node and the check; `-v` (vidlens' info lines) prints them whole. Ray reruns what such a worker was
    doing, and vidlens the videos lost with it. Where this Ray has no such handler to wrap, its lines are
    printed as Ray prints them."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        handlers = list(dispatcher.handlers)
    except (ImportError, AttributeError):
        return
    for name, handler in handlers:
        if name == _RAY_HANDLER and not isinstance(handler, _Collapsing):
            dispatcher.remove_handler(name)
            dispatcher.add_handler(name, _Collapsing(handler))


def settle(quiet_s: float = 0.5, limit_s: float = 1.0) -> None:
    """Wait until Ray has relayed no line (nor sent an error) for `quiet_s`, `limit_s` at most: a worker's
    warning about the run's last videos reaches the driver a moment after it was written (Ray's log monitor
    reads its workers' files every 0.1 s: 0.09-0.10 s later on an idle machine, 2026-12-07), and could be
    printed after the run's summary. Returns at once where Ray relays nothing here."""
    # (not imported here: a local run never imports Ray)
    dispatcher = getattr(sys.modules.get("ray._private.ray_logging"), "global_worker_stdstream_dispatcher", None)
    relays = [handler for name, handler in getattr(dispatcher, "handlers", ())
              if name == _RAY_HANDLER and isinstance(handler, _Collapsing)]
    errors = getattr(sys.modules.get("ray._private.worker"), "print_to_stdstream", None)
    ray = sys.modules.get("ray")  # (the printer stays wrapped once Ray is shut down, and hears nothing more)
    relays += [errors] if isinstance(errors, _RayletDeaths) and ray is not None and ray.is_initialized() else []
    if not relays:
        return
    start = time.monotonic()
    while (now := time.monotonic()) - start < limit_s and now - max(start, *(r.last for r in relays)) < quiet_s:
        time.sleep(0.05)
