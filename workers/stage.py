"""The base of every pipeline stage: a small class, loaded once per worker, called per batch.

A stage is configured in `__init__` (where it loads its model once) and called with a
batch of tasks. It declares the `VideoTask` fields it reads and writes; the plan checks,
when it is built, that every field a stage reads was written by an earlier one.

A failure on one video never fails the batch: the stage first tries the batch as a whole,
and if that raises it retries each video alone, so one bad video becomes one `StageError`
and the others still get their results.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import sys
import time
import traceback
from typing import Any, ClassVar

import numpy as np

from workers.exhaustion import shortage
from workers.task import StageError, VideoTask

log = logging.getLogger(__name__)

#: CUDA's errors after which its context in this process is broken for good: every later call on
#: the GPU fails the same way, whatever it is given (`cudaGetErrorString`'s messages, as torch,
#: its driver API calls and Triton's kernels report them), and cuBLAS' and cuDNN's failures to
#: run a kernel, which such an error makes.
STICKY_CUDA_ERRORS = (
    "device-side assert triggered", "an illegal memory access was encountered", "unspecified launch failure",
    "an illegal instruction was encountered", "misaligned address", "the launch timed out and was terminated",
    "uncorrectable ECC error encountered", "hardware stack error", "invalid program counter",
    "CUBLAS_STATUS_EXECUTION_FAILED", "CUDNN_STATUS_EXECUTION_FAILED",
)

#: the column of a Ray Data batch that holds pickled tasks.
TASK_COLUMN = "task"
#: the column of rows that each hold a group of videos: a pickled list of pickled tasks (the
#: feed's rows, and the last Ray step's when it emits groups; see `pack` and `unpack`).
GROUP_COLUMN = "videos"


def encode_group(payloads: Any) -> bytes:
    """One group row's value: `payloads` (pickled tasks) as one pickled list (see `unpack`); the
    feed's rows and `pack`'s are made alike."""
    return pickle.dumps(list(payloads), protocol=pickle.HIGHEST_PROTOCOL)


def pack(payloads: Any) -> dict[str, np.ndarray]:
    """A batch of one row holding all of `payloads` (pickled tasks) as one group."""
    group = np.empty(1, dtype=object)
    group[0] = encode_group(payloads)
    return {GROUP_COLUMN: group}


def unpack(batch: dict[str, Any]) -> np.ndarray:
    """The pickled tasks of a batch of group rows, or of one-video rows."""
    if GROUP_COLUMN not in batch:
        return batch[TASK_COLUMN]
    listed = [payload for group in batch[GROUP_COLUMN] for payload in pickle.loads(group)]
    payloads = np.empty(len(listed), dtype=object)
    payloads[:] = listed
    return payloads


class Stage:
    """Base class: subclasses set `name`, `reads`, `writes` and implement `process`."""

    name: ClassVar[str] = "stage"
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    #: when True, a task whose decode failed, or whose fields this stage reads an earlier stage
    #: failed to write, still reaches `process` (none do today).
    accepts_failed: ClassVar[bool] = False
    #: when True, the constructor takes `preparers` (model role -> `FramePreparer`) made on the
    #: driver, rather than loading the models' processors in each worker (see `build_stage`).
    takes_preparers: ClassVar[bool] = False
    #: when True, `__call__` returns its batch as one group row (`pack`) rather than a row a
    #: video: set on the plan's last Ray step, whose blocks only the driver reads (see
    #: `pipeline.ray_executor.ray_dataset`).
    emits_groups: ClassVar[bool] = False

    def process(self, tasks: list[VideoTask]) -> None:
        """Fill this stage's fields on every task, in place. May raise; see `run`."""
        raise NotImplementedError

    def run(self, tasks: list[VideoTask]) -> list[VideoTask]:
        """Process tasks, turning exceptions into per-video `StageError`s; returns the same tasks."""
        live = [t for t in tasks if self._takes(t)]
        if not live:
            return tasks
        start = time.perf_counter()
        failure = None
        try:
            self.process(live)
        except Exception as exc:  # noqa: BLE001 - isolate the failing video below
            failure = exc
        if failure is not None:
            self._stop_if_device_lost(failure, live)
        if failure is not None and len(live) == 1:
            self._record_failure(live[0], failure)
        elif failure is not None:
            # each video alone, the batch's failure let go first, out of its except block: its
            # traceback holds the failed call's frames and their tensors (after CUDA ran out of
            # memory, the very memory each video's retry needs, held through every one)
            traceback.clear_frames(failure.__traceback__)
            failure = None
            try:
                _free_accelerator_cache()
            except Exception as exc:  # noqa: BLE001 - CUDA that cannot free its memory has failed for good
                raise DeviceLostError(f"stage {self.name}: the GPU failed on a batch of {len(live)} videos "
                                      f"({first_line(exc)}), and CUDA cannot go on in this process",
                                      self.name, _ids(live)) from exc
            for task in live:
                try:
                    self.process([task])
                except Exception as one_exc:  # noqa: BLE001 - one video's failure is a row
                    self._stop_if_device_lost(one_exc, [task])
                    self._record_failure(task, one_exc)
        elapsed = (time.perf_counter() - start) / len(live)
        ran_on = self.ran_on()
        for task in live:
            task.timings[self.name] = task.timings.get(self.name, 0.0) + elapsed
            if ran_on is not None:
                task.ran_on[self.name] = ran_on
            self.release(task)
        return tasks

    def _stop_if_device_lost(self, exc: Exception, tasks: list[VideoTask]) -> None:
        """DeviceLostError, from `exc`, where it is a sticky CUDA error: no video can run on this
        process' GPU any more, so each of the others would only get an errors row of its own,
        and each later batch too (see `__call__` for Ray, `pipeline.local` without it)."""
        if is_sticky_cuda_error(exc):
            videos = ", ".join(task.ref.uri for task in tasks[:3]) + (" ..." if len(tasks) > 3 else "")
            raise DeviceLostError(f"stage {self.name}: the GPU failed on {videos} ({first_line(exc)}), and CUDA "
                                  "cannot go on in this process", self.name, _ids(tasks)) from exc

    def _takes(self, task: VideoTask) -> bool:
        """Whether this stage runs on the video: it is among the video's stages, and no field it
        reads is missing because an earlier stage failed (that stage's errors row says why; a
        second row here, "no frames prepared", would only repeat it in the code's words)."""
        if task.stages is not None and self.name not in task.stages:
            return False
        return self.accepts_failed or not (task.failed or task.unwritten.intersection(self.reads))

    def ran_on(self) -> tuple[str, str] | None:
        """(device type, dtype name) this stage's model computes in; None for a stage without one."""
        return None

    def release(self, task: VideoTask) -> None:
        """Drop from `task` what only this stage reads (its model's frames), once it has run.

        Nothing later reads them, yet every later Ray stage would pickle them again and the
        driver unpickle them, and the local executor keep them in its queues. None by default.
        """

    def _record_failure(self, task: VideoTask, exc: Exception, message: str | None = None,
                        cause: str | None = None, bad_file: bool | None = None) -> None:
        """The video's errors row (`message`, or the exception and where it was raised; `cause`
        first where one is known, else what the machine ran out of, if it did: `shortage`, never
        the file's fault; `bad_file`, where not as the exception says: `StageError`); the fields
        this stage writes are left unwritten for the stages after it."""
        # a decode error names the file first: the row has it in its uri column, and the same
        # failure of two videos is one message (`GROUP BY message`)
        said = str(exc).removeprefix(f"{task.ref.uri}: ")
        if cause is None and (ran_out := shortage(exc)) is not None:
            # said first: the error names the video as if it were at fault; the next run tries it again
            cause, bad_file = ran_out, False
        first = f"{cause}: " if cause else ""
        log.warning("stage %s failed on %s: %s%s", self.name, task.ref.uri, first, said)
        written = (message or _describe(exc)).removeprefix(f"{task.ref.uri}: ")
        if bad_file is None:
            bad_file = getattr(exc, "bad_file", False) is True
        task.errors.append(StageError(stage=self.name, error_type=type(exc).__name__, message=first + written,
                                      bad_file=bad_file))
        task.unwritten.update(self.writes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data entry point: one batch of pickled tasks in, the same batch out."""
        tasks = [VideoTask.from_bytes(payload) for payload in batch[TASK_COLUMN]]
        try:
            self.run(tasks)
        except DeviceLostError as exc:
            # Ray fails the run at an exception a stage raises, but replaces a worker that dies
            # (`max_restarts`) and gives its batch to the new one, with a CUDA context of its own
            # (a video that breaks the GPU every time is lost after `max_task_retries`)
            log.error("%s: this worker exits, for Ray to start another in its place", exc)
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(EXIT_DEVICE_LOST)
        out = np.empty(len(tasks), dtype=object)
        out[:] = [task.to_bytes() for task in tasks]
        return pack(out) if self.emits_groups else {TASK_COLUMN: out}


class DeviceLostError(RuntimeError):
    """The GPU failed in a way CUDA does not recover from in the process (`STICKY_CUDA_ERRORS`),
    in stage `stage` on the batch of `videos` (their ids; the local executor's run records them
    as failed: `pipeline.job`)."""

    def __init__(self, message: str, stage: str = "", videos: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.stage = stage
        self.videos = videos


def _ids(tasks: list[VideoTask]) -> tuple[str, ...]:
    return tuple(task.ref.video_id for task in tasks)


#: the exit status of a Ray worker that leaves after `DeviceLostError`.
EXIT_DEVICE_LOST = 75


def is_sticky_cuda_error(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is a sticky CUDA error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        said = str(exc)
        if "CUDA" in said and any(error in said for error in STICKY_CUDA_ERRORS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def build_stage(target: str, config: Any, preparers: dict | None = None) -> Stage:
    """The stage `target` for `config` (a RunConfig), given `preparers` if it takes them."""
    stage_class = load_stage_class(target)
    if preparers is not None and stage_class.takes_preparers:
        return stage_class(config, preparers=preparers)
    return stage_class(config)


def load_stage_class(target: str) -> type[Stage]:
    """The stage class a "module:Class" target names, imported on first use."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _free_accelerator_cache() -> None:
    """Give CUDA's cached blocks back, where this process uses CUDA (after a batch failed)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message (CUDA's errors go on with advice on debugging)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _describe(exc: BaseException) -> str:
    """One line for the errors table, with the innermost frame for debugging."""
    message = str(exc).strip() or type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        message += f" (at {last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"
    return message
