"""A stopped command's cleanup on its output's store, bounded in time (`pipeline.stop_deadline`):
when its time runs, what a step that fails or is left leaves said, and that neither the time nor
what was left carries over into a later command or run of the same process."""

from __future__ import annotations

import json
import threading
import types
from concurrent.futures import Future

import pytest

from pipeline import command_stops, stop_deadline
from pipeline.lock import OutputLock
from pipeline.store import Store


@pytest.fixture(autouse=True)
def no_stop_before_or_after():
    stop_deadline.clear()
    yield
    stop_deadline.clear()


def test_the_cleanups_time_runs_from_its_first_step_on_the_store_not_from_the_stop(monkeypatch):
    """Ending the workers after a stop may take longer than the cleanup's time on the store: its first
    step is still waited for, and once the time since it is up, a step is not started at all."""
    now = [1000.0]
    monkeypatch.setattr(stop_deadline, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    ran: list[str] = []
    stop_deadline.stopping()
    now[0] += 60  # (the workers took a minute to end)
    assert stop_deadline.waited(lambda: ran.append("last batch"), "its last batch")
    now[0] += stop_deadline.CLEANUP_S / 2
    assert stop_deadline.waited(lambda: ran.append("lock"), "its lock")
    now[0] += stop_deadline.CLEANUP_S / 2  # (its time just up)
    assert not stop_deadline.waited(lambda: ran.append("too late"), "something after")
    assert ran == ["last batch", "lock"] and stop_deadline.LEFT == ["something after"]


def test_no_step_starts_after_one_left_running_whatever_the_clock_says(monkeypatch):
    """(mutation review) The lock is not given back while a batch left publishing may still write: a step
    left running stops every step after it, not only the time being up (a wait that came back before its
    time, a clock stepped back). One that failed, done, does not."""
    def refused() -> None:
        raise OSError("refused")

    monkeypatch.setattr(stop_deadline, "CLEANUP_S", 0.1)
    hung, ran = threading.Event(), []
    stop_deadline.stopping()
    with pytest.raises(OSError):
        stop_deadline.waited(refused, "a step that failed")
    assert stop_deadline.waited(lambda: ran.append("after a failed one"), "its lock")
    try:
        assert not stop_deadline.waited(hung.wait, "its last batch")
        stop_deadline._deadline[:] = [stop_deadline.time.monotonic() + 60]  # (the clock says there is time left)
        assert not stop_deadline.waited(lambda: ran.append("lock"), "its lock")
    finally:
        hung.set()
    assert ran == ["after a failed one"] and stop_deadline.LEFT == ["a step that failed", "its last batch", "its lock"]


def test_a_step_that_fails_at_a_stop_raises_its_error_and_is_named_as_left():
    def refused() -> None:
        raise ConnectionRefusedError("the bucket refused the connection")

    stop_deadline.stopping()
    with pytest.raises(ConnectionRefusedError, match="refused the connection"):
        stop_deadline.waited(refused, "its lock")
    assert stop_deadline.left_said().endswith("as a killed job does: its lock")


def test_a_publisher_closed_at_a_stop_leaves_a_batch_the_store_does_not_finish(monkeypatch, tmp_path):
    """A batch still being published when the cleanup's time is up is left as a killed run's, and said;
    without a stop, `close` waits for it (the lock is not given back under it)."""
    from pipeline.publisher import Publisher
    from schemas.config import RunConfig

    monkeypatch.setattr(stop_deadline, "CLEANUP_S", 0.2)
    publisher = Publisher(Store(str(tmp_path / "out")), "20240101T000000000000Z-aaaaaa", "2024-01-01",
                          RunConfig.from_dict({}))
    failed, hung = Future(), Future()
    failed.set_exception(OSError("the bucket refused it"))
    publisher._publishing += [failed, hung]  # (one batch failed, the next one's store never answers)
    answered = threading.Timer(30, hung.set_result, [None])  # (a close that waits for it fails, not hangs)
    answered.start()
    try:
        stop_deadline.stopping()
        publisher.close()
        assert not hung.done()
    finally:
        answered.cancel()
    assert stop_deadline.left_said().endswith(
        "as a killed job does: the batches it was publishing: the next run rolls forward those whose manifest was "
        "written, and clears the others and does their videos again")


def test_a_command_starts_with_nothing_left_and_the_whole_time_whatever_the_one_before_left(monkeypatch):
    """`pipeline.cli.main` used as a library: a command after a stopped one that left a step (its
    deadline past) has the cleanup's whole time at its own stop, and its stopped line says only what it left."""
    monkeypatch.setattr(stop_deadline, "CLEANUP_S", 0.2)
    hung = threading.Event()
    try:
        with command_stops.handling_stops():
            stop_deadline.stopping()
            assert not stop_deadline.waited(hung.wait, "its last batch")
        assert command_stops.exit_at_once()  # (`command` then ends the process: the step may still run)
        with command_stops.handling_stops():
            assert stop_deadline.left_said() == "" and not command_stops.exit_at_once()
            stop_deadline.stopping()
            ran: list[str] = []
            assert stop_deadline.waited(lambda: ran.append("lock"), "its lock") and ran == ["lock"]
            assert stop_deadline.left_said() == ""
    finally:
        hung.set()


def test_a_run_after_a_stopped_command_in_the_same_process_gives_its_lock_back(monkeypatch):
    """A program that called `pipeline.cli.main` (stopped, its cleanup's time spent on a store that did
    not answer) and then runs `run_job` itself: that run, never stopped, waits on the store as ever and
    gives its lock back. The stop's deadline stayed set once the command had ended, and the later run's
    lock was left at once as a stopped run's, naming this live process: no job could take it for 600 s."""
    monkeypatch.setattr(stop_deadline, "CLEANUP_S", 0.2)
    store = Store("memory://vidlens-after-a-stop/out")
    lock_path = store.path("_vidlens", "lock")
    hung = threading.Event()
    try:
        with command_stops.handling_stops():
            stop_deadline.stopping()
            assert not stop_deadline.waited(hung.wait, "its last batch")
        with OutputLock(store, "after", heartbeat_s=0.1):
            assert json.loads(store.fs.cat_file(lock_path))["run_id"] == "after"
        assert not store.fs.exists(lock_path)
        # (what the stopped command left stays said, for its exit: `command_stops.exit_at_once`)
        assert stop_deadline.LEFT == ["its last batch"]
    finally:
        hung.set()


def test_a_lock_the_store_refuses_to_give_back_raises_where_no_stop_is_under_way(monkeypatch):
    """Only a stop's cleanup leaves a lock it could not give back (said in `LEFT`); a run's normal end
    raises the store's error, as it always did."""
    store = Store("memory://vidlens-lock-refused/out")
    lock = OutputLock(store, "ended", heartbeat_s=0.1)
    lock.__enter__()

    def refused(path, **kwargs):
        raise PermissionError("the bucket refused the delete")

    monkeypatch.setattr(store.fs, "rm", refused)
    with pytest.raises(PermissionError, match="refused the delete"):
        lock.release()
    assert stop_deadline.LEFT == []


def test_a_stopped_compact_says_the_lock_its_cleanup_left(capsys):
    from pipeline.cli import _stop_said

    stop_deadline.stopping()
    stop_deadline.LEFT.append("its lock s3://b/out/_vidlens/lock")
    command_stops.STOPPED[:] = [143]
    try:
        with pytest.raises(SystemExit), _stop_said("compacting s3://b/out", "run the same command again"):
            raise SystemExit(143)
    finally:
        command_stops.STOPPED.clear()
    assert capsys.readouterr().err == (
        "vidlens: compacting s3://b/out stopped (SIGTERM): run the same command again. Its cleanup could not finish "
        "on the output's store within 5 s, and left, as a killed job does: its lock s3://b/out/_vidlens/lock\n")


def test_a_step_left_running_does_not_hold_the_process_exit(tmp_path):
    """The step left running (a request to a store that never answers) runs on a daemon thread: a
    program's exit does not wait for it (the command ends at once too: `command_stops.exit_at_once`)."""
    import subprocess
    import sys
    from pathlib import Path

    program = ("import threading\nfrom pipeline import stop_deadline\nstop_deadline.CLEANUP_S = 0.1\n"
               "stop_deadline.stopping()\nprint(stop_deadline.waited(threading.Event().wait, 'its lock'))\n")
    ended = subprocess.run([sys.executable, "-c", program], cwd=Path(__file__).resolve().parents[1],
                           capture_output=True, text=True, timeout=60)
    assert (ended.returncode, ended.stdout) == (0, "False\n"), ended.stderr


def test_a_lock_given_back_at_a_stop_is_not_written_again_by_its_last_heartbeat(monkeypatch):
    """The lock is removed once its heartbeat has ended: a heartbeat's write still under way when the
    stop's cleanup gives the lock back would write it again after its removal, a lock left behind."""
    store = Store("memory://vidlens-last-heartbeat/out")
    lock_path = store.path("_vidlens", "lock")
    lock = OutputLock(store, "stopped", heartbeat_s=0.05)
    lock.__enter__()
    writing, written, write = threading.Event(), threading.Event(), store.fs.pipe_file

    def slow_write(*args, **kwargs):
        if threading.current_thread().name != "vidlens-lock-heartbeat":
            return write(*args, **kwargs)
        writing.set()
        threading.Event().wait(0.5)  # (a store slow to answer)
        try:
            return write(*args, **kwargs)
        finally:
            written.set()

    monkeypatch.setattr(store.fs, "pipe_file", slow_write)
    assert writing.wait(30)
    stop_deadline.stopping()
    lock.release()
    assert written.wait(30)  # (the heartbeat's last write done, before or after the lock's removal)
    assert not store.fs.exists(lock_path) and stop_deadline.LEFT == []


def test_a_step_left_running_publishes_nothing_once_its_lock_was_left(monkeypatch):
    """Where the process goes on after a stopped command (a program that called `pipeline.cli.main`), a
    step its cleanup left running (its last batch, to a store that did not answer) may reach the store
    long after, when another job may hold the output (600 s without this one's heartbeat): it publishes
    no manifest. It did, its lock's guard dropped as the lock was left."""
    from pipeline.lock import LockedError

    monkeypatch.setattr(stop_deadline, "CLEANUP_S", 0.2)
    store = Store("memory://vidlens-left-step/out")
    answered, finished, refused = threading.Event(), threading.Event(), []

    def last_batch() -> None:
        try:
            answered.wait(30)
            store.publish({"kind": "batch", "run_id": "stopped", "batch": 0, "files": [], "ledger": []},
                          "stopped-00000.json")
        except LockedError as exc:
            refused.append(str(exc))
        finally:
            finished.set()

    with OutputLock(store, "stopped", heartbeat_s=0.1):
        stop_deadline.stopping()
        assert not stop_deadline.waited(last_batch, "its last batch")
    answered.set()  # (the store answers again)
    assert finished.wait(30)
    assert refused == ["memory://vidlens-left-step/out: run stopped left its lock at a stop, its cleanup's time on "
                       "the store spent: it publishes nothing more"]
    assert not store.fs.exists(store.path("_vidlens", "commits", "stopped-00000.json"))
