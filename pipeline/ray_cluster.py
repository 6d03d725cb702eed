"""Connecting to the Ray cluster a run or job uses, or starting a local instance, with the settings its
workers need (`ensure_ray`), and Ray's own log lines kept to what a user needs (`quiet_ray_logs`).
`pipeline.ray_executor` runs the plan there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import warnings
from collections.abc import Iterator

from pipeline import stops
from workers.storage_retries import cause_chain

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Hugging Face settings that the Ray workers of a run take from the shell that started it, when
#: set there (never credentials); `vidlens submit` hands the same ones to its job.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "TOKENIZERS_PARALLELISM")


#: Ray's lines that say what vidlens chose on purpose: its own progress bar in place of Ray
#: Data's, and Ray's default token authentication for the instance a run starts.
_CHOSEN = {"ray.data._internal.progress": "Progress bars disabled",
           "ray._private.authentication.authentication_token_setup": "Token authentication is enabled"}


def _not_chosen(record: logging.LogRecord) -> bool:
    return _CHOSEN.get(record.name, "\0") not in record.getMessage()


#: the logger of Ray Data's line for each block an execution loses and goes on without
#: (`pipeline.ray_executor._losing_blocks`), with the task's whole traceback
_LOST_BLOCK_LOGGER = "ray.data._internal.execution.streaming_executor_state"


def _lost_block_in_a_line(record: logging.LogRecord) -> bool:
    """Ray Data's error for a block lost and gone on without, as one line naming its cause, without
    the traceback (-v keeps it) or the setting it names (`max_errored_blocks`, vidlens' own): a
    listing queue killed once printed 60 lines of Ray's internals ("Ignoring this exception with
    remaining max_errored_blocks=58"), before vidlens' own warning said what it did about it
    (chaos soak on Ray, 2026-12-07)."""
    message = record.getMessage()
    if "Ignoring this exception" not in message or logging.getLogger().isEnabledFor(logging.INFO):
        return True
    cause = record.exc_info[1] if record.exc_info else None
    if cause is not None:
        record.msg = f"{message.split(' Ignoring this exception', 1)[0].rstrip('.')} ({cause_in_a_line(cause)}): " \
                     "the run goes on without it (-v shows its traceback)"
        record.args, record.exc_info, record.exc_text = (), None, None
    return True


def cause_in_a_line(error: BaseException) -> str:
    """The Ray exception an error says ended a task, as `ActorDiedError: ...`: Ray wraps one it could not
    deserialize (`UnserializableException`) with the original's text, whose last such line names it."""
    text = str(error)
    found = re.findall(r"^(?:ray\.exceptions\.)?(\w+(?:Error|Exception)): (.+)$", text, re.MULTILINE)
    if found:
        name, said = found[-1]
        return f"{name}: {said.strip()}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


#: Ray Data's warning, as an execution ends, for a model stage's actor pool that got no input at all: every
#: video of the execution was lost before it (the listing's reader lost with its node: 4 warnings, one a
#: model stage, before vidlens' own that it runs them again). No pool size helps (a pool has an actor at
#: least), nor Ray Data's advice (`override_num_blocks`); a pool that got some, fewer than its min_size
#: (a user's `min_actors`), is still said
_NO_INPUT = r"The minimum number of concurrent actors for '.*' is set to \d+, but the operator only received 0 input"


def quiet_ray_logs() -> None:
    """Ray Data's info lines (each execution's plan and time) only with -v, as vidlens' own;
    none of Ray's warnings about what vidlens chose (`_CHOSEN`), nor about a model stage that got no
    input (`_NO_INPUT`); and a block lost a line, not a traceback (`_lost_block_in_a_line`)."""
    if not logging.getLogger().isEnabledFor(logging.INFO):
        for name in ("ray.data", "ray._private.runtime_env.packaging"):  # (the latter: `vidlens submit`'s upload)
            logging.getLogger(name).setLevel(logging.WARNING)
        # (a filter of the process's: the warning comes from Ray Data's executor thread; -v keeps it)
        warnings.filterwarnings("ignore", message=_NO_INPUT, category=UserWarning)
    for name in _CHOSEN:
        logging.getLogger(name).addFilter(_not_chosen)  # (once: the same filter is not added twice)
    logging.getLogger(_LOST_BLOCK_LOGGER).addFilter(_lost_block_in_a_line)


#: `ensure_ray`'s note, on the thread it ran on, that it connected this process to Ray (started a local
#: instance, joined a cluster or the job it runs in): the command on that thread ends that connection as
#: it ends (`pipeline.command_stops.shut_ray_down`). A Ray this process was connected to otherwise (by
#: the caller of `pipeline.cli.main`, a library's use) or on another thread (a second `main` there) is
#: not noted here, and stays connected
_CONNECTED = threading.local()


def note_connected() -> None:
    """Note that this thread's command connected this process to Ray (`ensure_ray`, as it connects)."""
    _CONNECTED.by_this_thread = True


def connected_here() -> bool:
    """Whether this thread's command connected this process to Ray (`note_connected`), until `disconnected`."""
    return getattr(_CONNECTED, "by_this_thread", False)


def disconnected() -> None:
    """Forget this thread's note (`note_connected`): the connection it made has been shut down."""
    _CONNECTED.by_this_thread = False


def ensure_ray(address: str | None) -> None:
    """Connect to the Ray cluster at `address` (or RAY_ADDRESS), or start a local instance, and note that
    this thread's command did (`connected_here`); where this process is connected already, that
    connection is used as it is, and not noted. The crash traces that Ray relays from workers whose node
    went away, and Ray's notes of a node's raylet gone, are printed a line each (`pipeline.ray_relayed`)."""
    import ray

    from pipeline.ray_relayed import collapse_crash_traces, collapse_raylet_deaths

    if ray.is_initialized():
        collapse_crash_traces()
        collapse_raylet_deaths()
        return
    address = address.strip() if address else address  # (pasted with a space or newline)
    quiet_ray_logs()
    env_vars = {"PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")]))}
    # and the model cache: a run (unlike a submitted job) starts on the cluster, usually on its
    # head node, whose cache path the other nodes are set up to share or to have alike
    for name in (*FORWARDED_ENV, "HF_HOME"):
        if name in os.environ:
            env_vars[name] = os.environ[name]
    # inside a Ray job (vidlens submit) the job's runtime env already ships the project and its
    # settings to every worker, and Ray refuses a second one that sets the same variables
    in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
    if not in_job:
        _check_not_a_job_server(address)
        _check_reachable(address or os.environ.get("RAY_ADDRESS"))
    starts_instance = _starts_local_instance(address)
    kwargs = dict(address=address, ignore_reinit_error=True, logging_level=logging.WARNING, log_to_driver=True,
                  include_dashboard=False if starts_instance else None)

    def connect(**more: object) -> None:
        ray.init(**kwargs, **more)
        note_connected()  # (here, not once `stops.whole` ends: a stop held through ray.init is raised there)

    # a stop while ray.init runs is raised once it has returned (`stops.whole`): raised inside it, in the
    # middle of its core worker's start (the main thread in a recv), the run said it stopped (143) and its
    # process then aborted at the exit, -6 (chaos soak on Ray, 2026-12-07, twice)
    with _own_stop_handlers(), stops.whole():
        if in_job:
            connect()
        elif starts_instance:
            # the instance started here runs its workers in this process's environment: set there,
            # the settings reach the workers Ray starts ahead with the instance, which a job's
            # runtime env would turn away (each stage would then start its own, seconds on a laptop)
            with _environment(env_vars):
                try:
                    connect()
                except Exception as exc:  # noqa: BLE001 - Ray's is a bare Exception: a traceback and exit 1
                    raise RuntimeError(_not_started(exc)) from None
        else:
            try:
                connect(runtime_env={"env_vars": env_vars})
            except ConnectionError as exc:
                refused = _refused_token(exc)
                if refused is None:
                    raise
                raise RuntimeError(
                    f"the Ray cluster at {address or os.environ.get('RAY_ADDRESS')} (--ray-address or RAY_ADDRESS) "
                    f"refused this run's token ({refused}): set RAY_AUTH_MODE=token and the cluster's token as "
                    "RAY_AUTH_TOKEN or in the file RAY_AUTH_TOKEN_PATH names, as on its nodes") from None
    collapse_crash_traces()
    collapse_raylet_deaths()


def _not_started(exc: Exception) -> str:
    """The one line for a local Ray instance that did not start: Ray raises a bare Exception ("The
    current node timed out during startup. This could happen because some of the raylet failed to
    startup or the GCS has become overloaded."), which ended a run with its traceback and exit 1 on a
    busy machine (chaos soak on Ray, 2026-12-07), where a run that cannot start is exit 2, in a line."""
    said = " ".join(str(exc).split()) or type(exc).__name__
    return (f"Ray could not start its local instance on this machine ({said}); the machine may be too busy, or "
            "short of memory or of space in Ray's temp folder: run the same command again, or run with "
            "--executor local")


@contextlib.contextmanager
def _own_stop_handlers() -> Iterator[None]:
    """Keep this process's SIGTERM handler through `ray.init`, which sets its own (`sys.exit(15)`):
    a run on Ray stopped by SIGTERM exited 15, not 143, without the stop's cleanup (`pipeline.command_stops`).

    Not only after it: Ray's handler is not set while `ray.init` runs either (seconds where it starts
    an instance on a busy machine). A stop then exited 15 ("stopped (exit)"), and a second, which the
    stop's cleanup waits through, cut that cleanup short (chaos soak on Ray, 2026-12-07)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils

    handler = signal.getsignal(signal.SIGTERM)
    set_by_ray = ray_utils.set_sigterm_handler
    if handler is not None:
        ray_utils.set_sigterm_handler = lambda _handler: None  # (ray.init's, and its local node's)
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = set_by_ray
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


def _check_not_a_job_server(address: str | None) -> None:
    """RuntimeError for a job server's (dashboard's) http address, which `vidlens submit --address`
    takes, given to a run: Ray's own error blamed RAY_ADDRESS whichever way it was given."""
    given, where = (address, "--ray-address") if address else (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
    if given and given.strip().lower().startswith(("http://", "https://")):
        raise RuntimeError(
            f"{given.strip()} ({where}) is a Ray job server's (dashboard's) address, which `vidlens submit "
            "--address` takes: `vidlens run` joins a cluster at its head node's address, HOST:6379 (or "
            "ray://HOST:10001 for Ray Client)")


def _refused_token(exc: BaseException) -> str | None:
    """Ray's words where `ray.init` failed because the cluster refused the token (or its absence):
    Ray says only "Failed to connect to Ray cluster at ...", its cause the authentication error."""
    for seen in cause_chain(exc, limit=8):
        text = str(seen)
        if "AuthenticationError" in type(seen).__name__ or "InvalidAuthToken" in text:
            found = next((line for line in text.splitlines() if "InvalidAuthToken" in line), text.splitlines()[0])
            return found.split("Error: ", 1)[-1].split(". Ensure", 1)[0].strip()
    return None


def _check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """RuntimeError naming `address` where nothing answers at it: `ray.init` retries an
    unreachable cluster without end, and a nightly job would hang there."""
    import socket

    if not address or address in ("auto", "local"):
        return
    where = address.split("://", 1)[-1].rstrip("/")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        return  # Ray's own error says what is wrong with the form
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RuntimeError(
            f"Ray cluster at {address} (--ray-address or RAY_ADDRESS) cannot be reached: "
            f"{exc.strerror or exc}. Check the address (the head node's HOST:6379, or ray://HOST:10001 "
            "for Ray Client) and that the cluster is up (ray status on the head node)") from None


def _starts_local_instance(address: str | None) -> bool:
    """Whether `ray.init(address)` starts a Ray instance here rather than joining a running one.

    With no address, Ray joins a cluster that `ray start` left running on this machine.
    """
    if address is not None or os.environ.get("RAY_ADDRESS"):
        return False
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None) is None


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """This process's environment with `values` set, restored afterwards."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
