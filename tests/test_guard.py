"""The decode guard: results and errors come back from the child; hangs and crashes cost one video."""

from __future__ import annotations

import faulthandler
import functools
import os
import signal
import time

import numpy as np
import pytest

from workers.decode import VideoDecodeError
from workers.guard import DecoderCrashed, DecodeTimeout, describe_failure, fork_available, run_guarded

pytestmark = pytest.mark.skipif(not fork_available(), reason="the decode guard needs fork (Linux, macOS)")


def test_the_result_comes_back_with_writable_arrays_intact():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(40, 270, 480, 3), dtype=np.uint8)  # 15 MB, out of band
    times = np.linspace(0, 1, 40)
    result = run_guarded(lambda: ({"frames": frames, "times": times}, "pyav"), 30, "clip.mp4")
    np.testing.assert_array_equal(result[0]["frames"], frames)
    np.testing.assert_array_equal(result[0]["times"], times)
    assert result[1] == "pyav"
    result[0]["frames"][0, 0, 0, 0] = 7  # later stages may write into what they get


def test_the_childs_exception_is_raised_with_its_type_and_message():
    def broken():
        raise VideoDecodeError("clip.mp4: no video stream")

    with pytest.raises(VideoDecodeError, match="clip.mp4: no video stream"):
        run_guarded(broken, 30, "clip.mp4")
    with pytest.raises(IndexError, match="out of range") as raised:
        run_guarded(lambda: [][1], 30, "clip.mp4")
    # the errors row says where the child failed, not where the parent re-raised it
    assert describe_failure(raised.value).endswith("(at test_guard.py:%d in <lambda>)" % (_line() - 2))


def test_a_librarys_exit_in_the_child_is_the_videos_error_not_the_workers_end():
    # SystemExit came back as it was, ended the pool worker's video and, raised to the driver, the run
    import sys

    with pytest.raises(VideoDecodeError, match=r"a library called exit\(0\) while this video was read"):
        run_guarded(functools.partial(sys.exit, 0), 30, "clip.mp4")


def _line() -> int:
    import inspect

    return inspect.currentframe().f_back.f_lineno


def test_a_hung_decoder_is_killed_at_the_deadline():
    pid_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vidlens-guard-{os.getpid()}")

    def hang():
        with open(pid_file, "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(10**6)

    started = time.monotonic()
    with pytest.raises(DecodeTimeout, match=r"stuck\.mp4: decoding took longer than 2 s"):
        run_guarded(hang, 2.0, "stuck.mp4")  # (time for a loaded machine to fork it and write its pid)
    assert time.monotonic() - started < 30  # the deadline, not the sleep
    child = int(open(pid_file).read())
    os.unlink(pid_file)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # killed and reaped: nothing is left running


def segfault():
    faulthandler.disable()  # pytest's fault handler would print the child's stack; not needed here
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crash_in_native_code_is_one_error_not_a_dead_worker():
    with pytest.raises(DecoderCrashed, match=r"bad\.mp4: the decoder crashed \(killed by signal SIGSEGV\)"):
        run_guarded(segfault, 30, "bad.mp4")
    assert run_guarded(lambda: 42, 30, "next.mp4") == 42  # this process goes on


def test_no_timeout_runs_in_this_process():
    assert run_guarded(os.getpid, 0, "clip.mp4") == os.getpid()
    assert run_guarded(os.getpid, 30, "clip.mp4") != os.getpid()


def test_a_reused_child_serves_many_calls_then_is_replaced(monkeypatch):
    import workers.guard

    monkeypatch.setattr(workers.guard, "CALLS_PER_CHILD", 3)
    pids = [run_guarded(os.getpid, 30, "clip.mp4") for _ in range(4)]
    assert os.getpid() not in pids
    assert pids[0] == pids[1] == pids[2] != pids[3]  # one child for three calls, then a new one
    # a partial of a module-level function travels to the running child, arrays and all
    frames = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert run_guarded(functools.partial(np.flip, frames, 0), 30, "clip.mp4").tolist() == frames[::-1].tolist()


def _interrupted_then_done() -> str:
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C to the process group
    time.sleep(0.2)
    return "decoded"


@pytest.mark.skipif(not fork_available(), reason="forks its decode child")
def test_a_ctrl_c_its_worker_ignores_leaves_the_decode_child_decoding():
    # a script's background run ignores Ctrl-C; its decode children did not, and every video they
    # were decoding was recorded as a decoder crash
    from workers.guard import stop_children

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stop_children()  # (a child forked before this test took its worker's Ctrl-C then)
        assert run_guarded(_interrupted_then_done, 30, "clip.mp4") == "decoded"
        stop_children()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's run: the child just ends
        with pytest.raises(DecoderCrashed, match=r"killed by signal SIGINT"):
            run_guarded(_interrupted_then_done, 30, "clip.mp4")
    finally:
        stop_children()
        signal.signal(signal.SIGINT, previous)


def test_a_reused_child_that_hangs_or_crashes_is_replaced_and_the_next_video_goes_on():
    first = run_guarded(os.getpid, 30, "clip.mp4")
    with pytest.raises(DecodeTimeout, match=r"stuck\.mp4: decoding took longer than 0\.5 s"):
        run_guarded(functools.partial(time.sleep, 10**6), 0.5, "stuck.mp4")
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # the hung child was killed and reaped
    second = run_guarded(os.getpid, 30, "next.mp4")
    assert second != first
    with pytest.raises(DecoderCrashed, match=r"bad\.mp4: the decoder crashed \(killed by signal SIGSEGV\)"):
        run_guarded(segfault, 30, "bad.mp4")  # module-level: runs in the reused child, which dies
    assert run_guarded(os.getpid, 30, "next.mp4") not in (first, second)


def test_an_exception_from_a_reused_child_keeps_its_type_and_the_child():
    first = run_guarded(os.getpid, 30, "clip.mp4")
    with pytest.raises(VideoDecodeError, match="no video stream"):
        run_guarded(functools.partial(_raise, VideoDecodeError("clip.mp4: no video stream")), 30, "clip.mp4")
    assert run_guarded(os.getpid, 30, "clip.mp4") == first


def _raise(exc: BaseException) -> None:
    raise exc


def _hang_writing_pid(pid_file: str) -> None:
    with open(pid_file, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(10**6)


def _decode_in_a_worker(pid_file: str, picklable: bool) -> None:
    work = functools.partial(_hang_writing_pid, pid_file)
    run_guarded(work if picklable else (lambda: work()), 600, "stuck.mp4")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
@pytest.mark.parametrize("picklable", [True, False], ids=["reused child", "one-call child"])
def test_a_decode_child_ends_with_the_worker_that_forked_it(tmp_path, picklable):
    # a hung decode outlived its killed worker: it kept the pool's sentinel of the worker (the
    # driver waited forever) and the output's lock (every rerun was refused)
    import multiprocessing

    pid_file = str(tmp_path / "child.pid")
    worker = multiprocessing.get_context("fork").Process(target=_decode_in_a_worker, args=(pid_file, picklable))
    worker.start()
    deadline = time.monotonic() + 60
    while not os.path.exists(pid_file) or not open(pid_file).read():
        assert time.monotonic() < deadline, "the decode child did not start"
        time.sleep(0.05)
    child = int(open(pid_file).read())
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    lived = _alive(child)
    if lived:
        os.kill(child, signal.SIGKILL)
    assert not lived


def _killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer ends a process


def test_a_crash_says_the_file_is_bad_where_the_decoder_died_of_the_data_not_where_it_was_killed():
    """A decoder that dies of a signal bad data gives it (SIGSEGV) failed on the file's bytes, which
    every run meets again; one killed (SIGKILL: out of memory), timed out or ended by a library's
    exit() may pass in another run: runs give up on a bad file only (`pipeline.ledger`)."""
    def outcome(work, timeout_s: float = 30) -> tuple[str, bool]:
        with pytest.raises(VideoDecodeError) as raised:
            run_guarded(work, timeout_s, "clip.mp4")
        return type(raised.value).__name__, raised.value.bad_file

    assert outcome(segfault) == ("DecoderCrashed", True)  # the reused child
    assert outcome(lambda: segfault()) == ("DecoderCrashed", True)  # (a closure: a child of its own)
    assert outcome(_killed) == ("DecoderCrashed", False)
    assert outcome(lambda: _killed()) == ("DecoderCrashed", False)
    assert outcome(functools.partial(time.sleep, 10**6), 0.5) == ("DecodeTimeout", False)
    import sys

    assert outcome(functools.partial(sys.exit, 0)) == ("VideoDecodeError", False)
    # the child's own error keeps what it said of the file
    assert outcome(functools.partial(_raises, "no video stream", True)) == ("VideoDecodeError", True)
    assert outcome(functools.partial(_raises, "cannot be read (permission denied)", False)) == (
        "VideoDecodeError", False)


def _raises(message: str, bad_file: bool) -> None:
    raise VideoDecodeError(message, bad_file=bad_file)


def _crashes(attempts, crashes: int, how: signal.Signals) -> str:
    """Note this attempt's process in `attempts` (a file); die of `how` in the first `crashes`."""
    with open(attempts, "a") as noted:
        noted.write(f"{os.getpid()}\n")
    if len(open(attempts).read().split()) <= crashes:
        faulthandler.disable()
        os.kill(os.getpid(), how)
    return "decoded"


@pytest.mark.parametrize("closure", [False, True])
def test_a_crash_a_bad_file_gives_is_decoded_once_more_in_a_new_child_before_it_counts(tmp_path, closure, caplog):
    """A decoder's abort may be the machine's (an allocation failing under memory pressure), and
    runs give up on a bad file: a crash as a bad file gives one is tried once more in a fresh
    child, which decodes the video where the crash was not the file's; only two in a row are."""
    def run(crashes: int, how: signal.Signals = signal.SIGABRT) -> tuple[object, list[str]]:
        attempts = tmp_path / f"{crashes}-{how.name}"
        work = functools.partial(_crashes, attempts, crashes, how)
        try:
            outcome = run_guarded((lambda: work()) if closure else work, 30, "clip.mp4")
        except DecoderCrashed as crashed:
            outcome = crashed
        return outcome, attempts.read_text().split()

    decoded, attempts = run(1)
    assert decoded == "decoded" and len(set(attempts)) == 2 and str(os.getpid()) not in attempts
    assert "clip.mp4: the decoder crashed (killed by signal SIGABRT); decoding it once more, in a new child" in caplog.text
    crashed, attempts = run(2, signal.SIGSEGV)
    assert (str(crashed), crashed.bad_file, len(set(attempts))) == (
        "clip.mp4: the decoder crashed (killed by signal SIGSEGV)", True, 2)
    killed, attempts = run(2, signal.SIGKILL)  # (out of memory: not the file's, and not tried again)
    assert (killed.bad_file, len(attempts)) == (False, 1)
    assert str(killed).startswith("clip.mp4: the decoder crashed (killed by signal SIGKILL, as the kernel's "
                                  "out-of-memory killer ends a process: give the job more memory or run fewer")
    assert run_guarded(os.getpid, 30, "next.mp4") != os.getpid()


def test_a_crash_under_a_memory_limit_is_not_taken_for_the_files(tmp_path, monkeypatch):
    """Under an address-space limit (ulimit -v; a batch scheduler's h_vmem) a decoder whose
    allocation fails aborts in every child alike: two crashes in a row were the file's, and runs
    gave up on a whole video for the machine's sake. There a crash is no bad file's, and says why
    (and, as a crash of the machine's, is not tried again in this run)."""
    import resource

    limited = {resource.RLIMIT_AS: (3 * 2**30, resource.RLIM_INFINITY)}
    getrlimit = resource.getrlimit
    monkeypatch.setattr(resource, "getrlimit", lambda kind: limited.get(kind) or getrlimit(kind))
    work = functools.partial(_crashes, tmp_path / "attempts", 2, signal.SIGABRT)
    with pytest.raises(DecoderCrashed) as crashed:
        run_guarded(work, 30, "clip.mp4")
    assert not crashed.value.bad_file and len((tmp_path / "attempts").read_text().split()) == 1  # (the next run's)
    assert str(crashed.value) == ("clip.mp4: the decoder crashed (killed by signal SIGABRT) (or out of memory: this "
                                  "process may use 3072 MiB, ulimit -v, and a decoder short of memory fails alike; "
                                  "not counted as the file's)")
