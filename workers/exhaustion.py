"""What the machine ran out of, where an error says so: disk space, open files, memory.

A nightly job meets a full disk, a low `ulimit -n` or a memory limit as errors that name a file
("[Errno 24] Too many open files: '/videos/a.mp4'"), which read as that file's fault. An errors
row, or the run's own error, says first what ran out and what to do (`shortage`); such a failure
is never counted as the file's (`workers.task.StageError.bad_file`).
"""

from __future__ import annotations

import errno
import os
import tempfile

#: errnos of a machine that ran out of something: what the sentence is built from (`shortage`)
_SPACE = (errno.ENOSPC, errno.EDQUOT)
_FILES = (errno.ENFILE, errno.EMFILE)  # (ENFILE's words first: EMFILE's begin them)
_MEMORY = (errno.ENOMEM,)
_TOO_LARGE = (errno.EFBIG,)
_KNOWN = _SPACE + _FILES + _MEMORY + _TOO_LARGE


def shortage(exc: BaseException, output: str | None = None) -> str | None:
    """One sentence naming what the machine ran out of in `exc` (or an error it came from, or
    one its message quotes, as a wrapped error's does) and what to do; None where it is no such
    error. `output`: the run's output, named where a full disk's error names no file."""
    found = _ran_out_in(exc)
    if found is None:
        return None
    code, error = found
    if code in _SPACE:
        temp = f"the temp folder ({tempfile.gettempdir()}, set by TMPDIR)"
        # (the file of the error that ran out: a library's error raised from it names none)
        where = _folder_of(error) or (f"the output ({output}) or {temp}" if output
                                      else f"{temp} or the output's folder")
        said = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
        return f"{said}: free space in {where}"
    if code == errno.EMFILE:
        return (f"too many open files (this process may open {_open_files_limit()}: ulimit -n): raise the limit, "
                "or run fewer workers")
    if code == errno.ENFILE:
        return ("too many open files on this machine (its limit, fs.file-max, is reached): close other programs' "
                "files or raise it")
    if code in _TOO_LARGE:
        return ("a file grew past the largest this process may write (ulimit -f) or the file system holds: "
                "raise the limit")
    return "out of memory: give the job more memory (ulimit -v, the container's limit) or run fewer workers"


def _ran_out_in(exc: BaseException) -> tuple[int, BaseException] | None:
    """The errno of the first error in `exc`'s chain that ran out of something, or that its
    message quotes (a wrapped error: "cannot download ...: OSError: [Errno 28] No space left ..."),
    and that error."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemoryError):
            return errno.ENOMEM, error
        if isinstance(error, OSError) and error.errno in _KNOWN:
            return error.errno, error
        text = str(error)
        if "bad_alloc" in text:  # C++'s allocation failure, in onnxruntime's or decord's words
            return errno.ENOMEM, error
        for code in _KNOWN:
            if os.strerror(code) in text:
                return code, error
        error = error.__cause__ or error.__context__
    return None


def _folder_of(exc: BaseException) -> str | None:
    """The folder of the file that could not be written, where the error names it."""
    name = getattr(exc, "filename", None)
    return os.path.dirname(os.path.abspath(name)) if isinstance(name, str) and name else None


def _open_files_limit() -> str:
    try:
        import resource  # (Unix only)

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError):
        return "a limited number"
    return "any number" if soft == resource.RLIM_INFINITY else str(soft)


def memory_limit_note() -> str:
    """"" where this process may allocate without a limit of its own; under an address-space or
    data limit (`ulimit -v`, `ulimit -d`: a batch scheduler's h_vmem sets one), the note a decoder's
    verdict on the file's bytes gets, which is then no bad file's (`VideoDecodeError.bad_file`).
    There an allocation that fails makes FFmpeg's H.264 decoder report invalid data ("Error
    splitting the input into NAL units") and a C++ decoder abort, as a damaged file does, and an
    8K clip read whole was "no frame could be decoded" in every run, given up on."""
    try:
        import resource  # (Unix only)

        limits = [(flag, resource.getrlimit(kind)[0]) for flag, kind in (("-v", resource.RLIMIT_AS),
                                                                          ("-d", resource.RLIMIT_DATA))]
    except (ImportError, OSError, AttributeError):
        return ""
    for flag, soft in limits:
        if soft != resource.RLIM_INFINITY:
            return (f" (or out of memory: this process may use {soft // 2**20} MiB, ulimit {flag}, and a decoder "
                    "short of memory fails alike; not counted as the file's)")
    return ""
