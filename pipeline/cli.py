"""The `vidlens` command line (also `python -m pipeline`)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from typing import Any

import pipeline.stops
from pipeline.results_cli import COMMANDS as RESULTS_COMMANDS
from pipeline.results_cli import add_commands as add_results_commands
from pipeline.results_cli import at_least_one
from pipeline.results_cli import run_command as run_results_command
from pipeline.submit import COMMANDS as SUBMIT_COMMANDS
from pipeline.submit import SubmitError
from pipeline.submit import add_commands as add_submit_commands
from pipeline.storage_errors import storage_problem
from pipeline.summary import RunSummary, counted
from pipeline.submit import run_command as run_submit_command
from schemas.config import ALL_STAGES, ConfigError, RunConfig, setting_from_text
from workers.redaction import install_log_redaction, redact, register_secrets
from workers.storage import store_of

#: command-line flags that map straight onto configuration keys.
_FLAG_KEYS = {
    "stages": "stages",
    "embed_model": "models.embed",
    "caption_model": "models.captions",
    "device": "models.device",
    "dtype": "models.dtype",
    "sampling": "sampling.mode",
    "num_frames": "sampling.num_frames",
    "sample_fps": "sampling.fps",
    "max_frames": "sampling.max_frames",
    "queries_file": "match.queries_file",
    "executor": "resources.executor",
    "ray_address": "resources.ray_address",
    "num_gpus_per_actor": "resources.num_gpus_per_actor",
    "max_actors": "resources.max_actors",
    "videos_per_batch": "resources.videos_per_batch",
    "endpoint_url": "storage.endpoint_url",
    "region": "storage.region",
    "anon": "storage.anon",
}


#: KEY=VALUE arguments whose value argparse's errors must not repeat (a storage secret)
_SECRET_ARGUMENT = re.compile(r"\b([\w.]*(?:secret|key|token|password|credential|connection_string|sas)[\w.]*)=\S+",
                              re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse, whose errors ("unrecognized arguments: ... secret=...") hide secrets' values."""

    def error(self, message: str):  # type: ignore[override]
        super().error(_SECRET_ARGUMENT.sub(r"\1=***", message))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(
        prog="vidlens",
        description="Batch video understanding: videos in, Parquet tables out.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log more: the info lines too, the worker processes' among them")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="process a folder, file, glob or bucket of videos")
    run.add_argument("source", help="a folder (recursive), a video file, a local glob (globs are not matched "
                                     "in buckets), an s3://, gs://, az:// prefix or object, or a .csv/.parquet "
                                     "manifest")
    run.add_argument("--out", required=True, help="output folder or bucket URL; one sub-folder per table")
    add_config_arguments(run)
    run.add_argument("--no-progress", action="store_true",
                     help="no progress bar (there is none where stderr is not a terminal)")
    run.add_argument("--summary-json", metavar="PATH", help="also write the run summary as JSON to PATH")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--incremental", dest="full", action="store_false",
                      help="(the default) process only new and changed videos, videos whose settings changed "
                           "(only the changed stages rerun) and videos that failed; skip the rest; "
                           "with no ledger in OUT yet, that is every video")
    mode.add_argument("--full", dest="full", action="store_true",
                      help="reprocess every listed video whatever the ledger in OUT says")
    run.set_defaults(full=False)  # two flags share `full`: without this, store_false's default (True) wins
    run.add_argument("--retry-failed", action="store_true",
                     help="also run the videos given up on: those whose file failed them as a whole in "
                          "incremental.give_up_after runs in a row (default 3), unchanged since")
    run.add_argument("--run-date", metavar="YYYY-MM-DD",
                     help="the run_date partition the results go to (default: today, UTC); rerunning a date "
                          "replaces that date's results")
    run.add_argument("--dry-run", action="store_true",
                     help="only say what the run would do: each video it would process and why, one a line "
                          "(decision, tab, URI), and the videos it would mark missing; nothing is run or written")

    schedule = commands.add_parser("schedule", help="print (or install) a nightly cron entry or systemd timer")
    schedule.add_argument("source", help="what to process every night (as for run)")
    schedule.add_argument("--out", required=True, help="output folder or bucket URL (as for run)")
    schedule.add_argument("--at", default="02:00", metavar="HH:MM", help="time of day, local time (default 02:00)")
    schedule.add_argument("--submit", metavar="ADDRESS", help="submit the job to this Ray cluster instead")
    schedule.add_argument("--config", help="YAML (or .toml) configuration file for the runs")
    schedule.add_argument("--log-dir", help="local folder for the log and the nightly JSON summaries")
    schedule.add_argument("--systemd", action="store_true", help="systemd user timer instead of a cron entry")
    schedule.add_argument("--install", action="store_true", help="install it (crontab or ~/.config/systemd/user)")

    compact = commands.add_parser("compact", help="merge the small files of past runs into large ones")
    compact.add_argument("out", help="output folder or bucket URL")
    compact.add_argument("--run-date", metavar="YYYY-MM-DD",
                         help="only this run date (default: all)")
    compact.add_argument("--rows-per-file", type=at_least_one, default=500_000,
                         help="rows per compacted file (default 500000; a run writes output.rows_per_file, 50000)")
    compact.add_argument("--config", help="YAML configuration whose `storage:` section reaches the bucket")
    add_storage_arguments(compact)
    compact.set_defaults(query=[], set=[])  # what `config_from_args` reads of the run command's flags

    forget = commands.add_parser("forget", help="take videos out of an output: every row of theirs, and their ledger "
                                                "entries (deleted or taken-down videos)")
    forget.add_argument("out", help="output folder or bucket URL")
    forget.add_argument("uris", nargs="*", metavar="URI", help="source URIs of the videos, as in videos.uri")
    forget.add_argument("--missing", action="store_true",
                        help="every video the ledger marks missing (gone from the source at a complete listing)")
    forget.add_argument("--config", help="YAML configuration whose `storage:` section reaches the bucket")
    add_storage_arguments(forget)
    forget.set_defaults(query=[], set=[])

    add_results_commands(commands)
    add_submit_commands(commands)

    doctor = commands.add_parser("doctor", help="check this installation offline with tiny models")
    doctor.add_argument("--config", help="also check that the models this YAML config names can be loaded")
    doctor.add_argument("--keep", metavar="DIR", help="keep the doctor's clips, models and outputs in DIR")
    doctor.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="where the trial run runs: on a local Ray instance (default), or without Ray")
    return parser


def check_run_date_argument(args: argparse.Namespace) -> None:
    """Every --run-date is a real calendar date, YYYY-MM-DD: else ValueError naming the flag
    (one line, not argparse's usage block)."""
    from pipeline.output_checks import check_run_date

    if getattr(args, "run_date", None) is not None:
        try:
            check_run_date(args.run_date)
        except ValueError as exc:
            raise ValueError(f"--run-date: {exc}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that build or override the run configuration."""
    parser.add_argument("--config", help="YAML (or .toml) configuration file (see docs/config.example.yaml)")
    parser.add_argument("--stages", help=f"comma-separated stages to run (default all: {','.join(ALL_STAGES)})")
    parser.add_argument("--query", action="append", default=[], metavar="TEXT",
                        help="text query to score against every video and segment (repeatable; added to the "
                             "config's match.queries)")
    parser.add_argument("--queries-file", help="text file with one query per line (lines starting with # skipped)")
    parser.add_argument("--embed-model", help="video-text model: Hugging Face id or local folder")
    parser.add_argument("--caption-model", help="captioning model: Hugging Face id or local folder")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (an Apple GPU)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                        help="the models' compute precision (default auto: bf16 on GPUs and CPUs that have it, "
                             "else fp16 on GPUs, fp32 on CPUs)")
    parser.add_argument("--sampling", choices=("uniform", "fps", "keyframes"), help="frame sampling mode")
    parser.add_argument("--num-frames", type=int, help="frames per video in uniform mode")
    parser.add_argument("--sample-fps", type=float, help="frames per second in fps mode")
    parser.add_argument("--max-frames", type=int, help="cap on sampled frames per video")
    parser.add_argument("--executor", choices=("ray", "local"), help="ray (default) or local (one machine, no Ray: a pool of decode processes)")
    parser.add_argument("--ray-address", help="address of an existing Ray cluster (default: start one)")
    parser.add_argument("--num-gpus-per-actor", type=float, help="GPUs per model actor; fractions share a GPU")
    parser.add_argument("--max-actors", type=int, help="largest size of each model actor pool")
    parser.add_argument("--videos-per-batch", type=int, help="videos per model batch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any setting, e.g. --set captions.num_beams=3 (repeatable)")
    parser.add_argument("--config-env", metavar="NAME", help=argparse.SUPPRESS)  # vidlens submit's jobs
    add_storage_arguments(parser)


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that reach a bucket (besides a config's `storage:` section); every command has the same."""
    storage = parser.add_argument_group("buckets (credentials come from the environment: AWS_*, GOOGLE_*, AZURE_*)")
    storage.add_argument("--endpoint-url", help="the store's endpoint: S3-compatible (http://minio:9000), a GCS "
                         "emulator, or an Azure Blob endpoint (https://ACCOUNT.blob.core.chinacloudapi.cn; "
                         "Azurite: http://127.0.0.1:10000/ACCOUNT)")
    storage.add_argument("--region", help="bucket region")
    storage.add_argument("--anon", action="store_true", default=None, help="anonymous access to a public bucket")
    storage.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                         help="any other fsspec option, e.g. use_ssl=false (repeatable)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The configuration: YAML file (if any), then flags, then --set overrides."""
    config = RunConfig.from_file(args.config) if args.config else RunConfig()
    if getattr(args, "config_env", None):
        config = _config_from_env(args.config_env)
    overrides: dict[str, Any] = {}
    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    set_keys = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set sampling.num_frames=16")
        # a store option as --storage-option reads it: YAML 1.1 made account_name=0123 the number 83
        overrides[key.strip()] = (_parse_value(value) if key.strip().startswith("storage.options.")
                                  else setting_from_text(key.strip(), value))
        set_keys.append(key.strip())
    given = {}
    for number, item in enumerate(getattr(args, "storage_option", None) or [], start=1):
        key, sep, value = item.partition("=")
        if not sep:
            # (what was given is not repeated: a secret may have lost its "secret=")
            raise ConfigError(f"--storage-option number {number} has no '=': expected KEY=VALUE, "
                              "e.g. use_ssl=false")
        given[key.strip()] = _parse_value(value)
    try:
        config = config.with_overrides(overrides) if overrides else config
    except ConfigError as exc:  # named as given where a --set gave it
        if any(str(exc).startswith((f"{key}:", f"{key}.")) for key in set_keys):
            raise ConfigError(f"--set {exc}") from None
        raise
    if given:  # added to the options the config file and --set give, mappings in them merged
        from workers.storage import deep_merge

        config = config.with_overrides({"storage.options": deep_merge(config.storage.options, given)})
    if args.query:  # added to the queries, those a --set gave too (it wrote over them)
        config = config.with_overrides({"match.queries": [*config.match.queries, *args.query]})
    if config.storage.anon:  # asked by the config file or --set too: a denied request is told to drop it
        args.anon = True
    return config


def _config_from_env(name: str) -> RunConfig:
    import json

    if name not in os.environ:
        raise ConfigError(f"--config-env {name}: the environment has no {name}")
    return RunConfig.from_dict(json.loads(os.environ[name]))


#: a plain decimal number, as a --storage-option value (0123 stays text: an account name, not 83).
_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]*)(\.[0-9]+)?")


def _parse_value(text: str) -> Any:
    """A --storage-option value: true, false or null (any case), a plain decimal number, a YAML
    mapping or list in braces or brackets (client_kwargs={region_name: eu-west-1}), else the
    text as written (YAML would read 00123 as 83, 12:30:00 as 45000 and off as false)."""
    import yaml

    bare = text.strip()
    if bare.lower() in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[bare.lower()]
    if _DECIMAL.fullmatch(bare):
        return float(bare) if "." in bare else int(bare)
    if bare[:1] in ("{", "["):
        try:
            return yaml.safe_load(bare)
        except yaml.YAMLError:
            pass
    return text


def command() -> None:
    """The `vidlens` command (and `python -m pipeline`): `main`, its exit code the process's.

    A run that stopped (SIGTERM, Ctrl-C) or failed while a model stage's thread was inside
    torch left that thread running, as it ends only between batches. Python ends such threads
    at its exit where they are, and through torch's C++ code that is std::terminate
    ("terminate called without an active exception"): exit 134, not 143, 130 or 2. Once
    `main` has returned (the run's cleanup done: its lock given back, its workers stopped),
    the process then exits at once, its output flushed.
    """
    try:
        code = main()
    except BaseException as exc:
        if not _pipeline_threads_running():
            raise
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        elif isinstance(exc, KeyboardInterrupt):
            code = 128 + signal.SIGINT
        else:  # a bug: its traceback, as Python would print it
            import traceback

            traceback.print_exc()
            code = 1
    _shut_ray_down(code)
    if _pipeline_threads_running():
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # (a closed pipe: nothing more can be said)
                pass
        os._exit(code)
    sys.exit(code)


def _shut_ray_down(code: int) -> None:
    """End the Ray instance a run started here (or its connection to a cluster) before the exit:
    in Ray's own handler at the exit, SIGTERM and Ctrl-C were back to their defaults, and a stop
    in that second ended with 143 or 130 a run whose summary said it had succeeded. The run has
    ended: a stop now is said and waited through, a second ends the process at once, with the
    run's exit code either way."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    stops = []

    def on_stop(signum: int, frame: Any) -> None:
        stops.append(signum)
        if len(stops) > 1:
            os._exit(code)
        _say(b"vidlens: the run has ended: Ray is shutting down (stop it once more to end it at once)\n")

    previous = {stop: signal.signal(stop, on_stop) for stop in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(stop) is not signal.SIG_IGN}  # (a script's `vidlens run &`: ignored, kept so)
    try:
        ray.shutdown()
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _pipeline_threads_running() -> bool:
    """Whether a thread of the local executor's pipeline (`pipeline.local`) has not ended yet
    (imported only where a run imported it)."""
    local = sys.modules.get("pipeline.local")
    return local is not None and any(thread.name.startswith(local.THREAD_PREFIX) and thread.is_alive()
                                     for thread in threading.enumerate())


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 3 some videos failed, 2 failed, 141 stdout
    closed, 143 stopped by SIGTERM, 130 by Ctrl-C; a run that a stop found at its end goes on to
    it, and exits with its own code)."""
    # systemd's, a scheduler's or `timeout`'s stop: ends the command as Ctrl-C does, its cleanup
    # run (it was killed outright, and a run from a bucket left its downloads in the temp folder).
    # Ctrl-C keeps Python's KeyboardInterrupt, noted too; where it is ignored (a job started in
    # the background by a script), it stays ignored.
    stops = [signal.SIGTERM]
    if threading.current_thread() is not threading.main_thread():
        stops = []
    elif signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        stops.append(signal.SIGINT)
    _STOPPED.clear()
    _LET_GO.clear()
    pipeline.stops.ending.clear()
    previous = {}
    try:
        for stop in stops:
            previous[stop] = signal.signal(stop, _on_stop)
        if stops:
            pipeline.stops.handled.set()
        try:
            code = _main(argv)
        except KeyboardInterrupt:  # Ctrl-C's, once its cleanup ran: the exit code, not a traceback
            if not _STOPPED:
                raise
            code = _STOPPED[0]
        stopped = _stop_code()
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
        pipeline.stops.handled.clear()
        pipeline.stops.ending.clear()
    return code if stopped is None else stopped


#: what a stop's exit code says it was
_STOP_NAMES = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGINT: "Ctrl-C"}
#: the exit codes of the stops received (SIGTERM, Ctrl-C), the first's the command's: its exception,
#: raised wherever the main thread was, is lost where that was a `__del__` (Python prints it as
#: "Exception ignored"); the run then failed on its workers' end (they stopped too) and its exit
#: said "error", 2
_STOPPED: list[int] = []
#: set where the first stop came once the run was at its end (`pipeline.stops.ending`), and was let go
_LET_GO = threading.Event()


def _stop_code() -> int | None:
    """The exit code of the stop that ended the command; None where none came, or where the run
    was at its end when the first came, and went on to it (`_LET_GO`): the command then ends as
    the run did (the runs table says so), not as stopped. A stop that came before, its exception
    lost (see _STOPPED), the run going on to its end all the same, is no stop let go."""
    return _STOPPED[0] if _STOPPED and not _LET_GO.is_set() else None


def _on_stop(signum: int, frame: Any) -> None:
    if _STOPPED:
        # a stop already under way: its cleanup (the workers ended, the lock given back) goes on.
        # Raised again inside it, it was cut short, and a model thread still inside torch at the
        # exit that followed aborted the process (134, "terminate called"). A third ends the
        # process at once: a cleanup that hangs (a store that does not answer), or a first stop
        # whose exception was lost (see _STOPPED), is not waited for ever.
        _STOPPED.append(128 + signum)
        if len(_STOPPED) > 2:
            try:
                _say(b"vidlens: stopped at once, its cleanup cut short\n")
            finally:
                os._exit(_STOPPED[0])
        _say(b"vidlens: already stopping, cleaning up (stop it once more to end it at once)\n")
        return
    _STOPPED[:] = [128 + signum]
    if pipeline.stops.ending.is_set():  # (a second then waited for and a third ending it, as above)
        _LET_GO.set()
        _say(b"vidlens: the run is publishing its last batch: it finishes that rather than stop "
             b"(stop it twice more to end it at once)\n")
        return
    pool = sys.modules.get("pipeline.cpu_pool")
    if pool is not None:  # its workers' SIGTERM is then the run's stop, not one worker's kill
        pool.DRIVER_STOPPED.set()
    stop = KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)
    if not pipeline.stops.held(stop):  # (else raised once the lines the run must finish whole are run)
        raise stop


def _say(line: bytes) -> None:
    """Write to stderr from a signal handler: not print, which raises "reentrant call" where it
    interrupts one of the main thread's, and nothing raised where stderr is a closed pipe (a
    `| tee` ended by the same Ctrl-C), which would cut the cleanup short."""
    try:
        os.write(2, line)
    except OSError:
        pass


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "forget" and not any(arg.startswith("-") for arg in extra):
        args.uris += extra  # URIs after a flag (`forget OUT --missing URI`): argparse leaves them over
    elif extra:
        # (a run's flags, --embed-model or --query, are no schedule's: its runs read them from a file)
        hint = (" (vidlens schedule takes the nightly runs' settings from a --config YAML file, as "
                "docs/config.example.yaml has them)") if args.command == "schedule" else ""
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    install_log_redaction()
    try:
        check_run_date_argument(args)
        if args.command == "run":
            return _run(args)
        if args.command == "schedule":
            return _schedule(args)
        if args.command == "compact":
            from pipeline.compact import compact
            from pipeline.results_cli import storage_options

            counts = compact(args.out, storage_options(args), run_date=args.run_date,
                             rows_per_file=args.rows_per_file)
            dated = f" of run date {args.run_date}" if args.run_date else ""
            if counts["files_before"]:
                print(f"compacted {args.out}: {counts['files_before']} files -> {counts['files_after']}, "
                      f"{counts['rows_before']} rows -> {counts['rows_after']} (rows no view shows are dropped)")
            elif counts["files_left"]:
                print(f"nothing to compact in {args.out}: its {counts['files_left']} files{dated} are as few as "
                      f"their rows allow, at most {args.rows_per_file} rows a file (--rows-per-file)")
            else:
                print(f"nothing to compact in {args.out}: no files{dated} (each run's date is in the runs table)")
            return 0
        if args.command == "forget":
            return _forget(args)
        if args.command in SUBMIT_COMMANDS:
            return run_submit_command(args)
        if args.command in RESULTS_COMMANDS:
            return run_results_command(args)
        if args.command == "doctor":
            from pipeline.doctor import run_doctor

            return run_doctor(config_path=args.config, keep=args.keep, executor=args.executor)
    except BrokenPipeError:
        # the reader of standard output stopped early (`| head`): no bad input, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would fail again
        return 141  # 128 + SIGPIPE, what a shell reports for a process the closed pipe ended
    except Exception as exc:  # noqa: BLE001 - sorted below: what the user can fix, or a bug
        stop = _stop_code()
        if stop is not None:  # a failure of the stop (its exception lost, see _STOPPED): not an error
            raise SystemExit(stop) from None
        said = _said(exc, args)
        if args.verbose or said is None:
            raise
        print(f"vidlens: error: {said}", file=sys.stderr)
        return 2
    return 2


def _said(exc: Exception, args: argparse.Namespace) -> str | None:
    """The one line a failure the user can fix is told in (bad config, missing source, unloadable
    model, a store that cannot be reached); None for anything else, a bug, which keeps its traceback.
    (Not a job server's in a bucket's words: its message says what to check, and the connection
    error under it is no bucket's, which the videos and output URIs would have it named as.)"""
    problem = None if isinstance(exc, SubmitError) else storage_problem(exc, _storage_uris(args),
                                                                         anon=bool(getattr(args, "anon", None)))
    if problem is None and not isinstance(exc, (ConfigError, ValueError, RuntimeError, OSError)):
        return None
    return redact(problem or str(exc))


def _storage_uris(args: argparse.Namespace) -> list[str]:
    """The bucket URLs the command was given (source, output), each once."""
    from pipeline.sources import is_remote

    uris = (getattr(args, name, None) for name in ("source", "out"))
    return list(dict.fromkeys(u for u in uris if isinstance(u, str) and is_remote(u)))


def _stores_reached(args: argparse.Namespace) -> set[str] | None:
    """The stores ("s3", "gs", "az") the command's storage settings reach: its source's and output's;
    None where a manifest lists the videos, whose rows may name any store."""
    from pipeline.sources import is_manifest

    source = getattr(args, "source", None)
    if isinstance(source, str) and is_manifest(source):
        return None
    return {store_of(uri) for uri in _storage_uris(args)}


def _run(args: argparse.Namespace) -> int:
    from pipeline.job import run_job

    config = config_from_args(args)
    register_secrets(config.storage, _stores_reached(args))  # hidden from every log line and message from here on
    if args.dry_run:
        return _dry_run(args, config)
    if args.summary_json:
        from pipeline.output_checks import check_file_path

        check_file_path(args.summary_json)  # before the run, not after hours of it
    try:
        summary = run_job(args.source, args.out, config, progress=not args.no_progress, full=args.full,
                          run_date=args.run_date, finish_through_stops=True, retry_failed=args.retry_failed)
    except BaseException as exc:  # a scheduler's watcher finds the night's summary all the same
        ended = _ended_summary(exc, args)
        _note_a_stop_let_go(ended)
        if args.summary_json:
            _write_summary(args.summary_json, ended)
        if ended.status == "stopped":  # (its cleanup done: the lock given back, the workers ended)
            run = f"run {ended.run_id}" if ended.run_id else "the run"
            print(f"vidlens: {run} stopped ({_STOP_NAMES.get(ended.exit_code, 'exit')}): the batches it published "
                  "stay; the same command goes on from there", file=sys.stderr)
        raise
    _note_a_stop_let_go(summary)
    print(summary.render())
    if args.summary_json:
        _write_summary(args.summary_json, summary)
    return summary.exit_code


def _note_a_stop_let_go(summary: RunSummary) -> None:
    """A warning in the summary where the first stop came as the run was at its end, and it went on
    to it (`_LET_GO`): why a run that was stopped says it succeeded (or failed), and exits so."""
    if _LET_GO.is_set():
        summary.warnings.append(f"{_STOP_NAMES.get(_STOPPED[0], 'a stop')} came as the run was publishing its last "
                                "batch: it finished that rather than stop")


def _dry_run(args: argparse.Namespace, config: RunConfig) -> int:
    """`vidlens run --dry-run`: each video the run would process, with its decision, each it would
    give up on and each it would mark missing, a line each on standard output; the counts and
    warnings on standard error."""
    from pipeline.job import LISTING_LOGGERS, dry_run

    if args.summary_json:
        raise ValueError("vidlens run --dry-run writes nothing: drop --summary-json (its lines are on standard output)")
    # the listing's warnings are the summary's, said once below (with -v, its info lines are shown as they come)
    listing = [] if args.verbose else [logging.getLogger(name) for name in LISTING_LOGGERS]
    for logger in listing:
        logger.propagate = False
    try:
        planned = dry_run(args.source, args.out, config, full=args.full, retry_failed=args.retry_failed)
    finally:
        for logger in listing:
            logger.propagate = True
    summary = planned.summary
    for reason, uri in planned.videos:
        print(f"{reason}\t{uri}")
    for uri in summary.given_up:  # (skipped, but each is a file to fix or replace: named)
        print(f"given up\t{uri}")
    for uri in summary.missing:
        print(f"missing\t{uri}")
    skipped = summary.counts["videos_listed"] - len(planned.videos)
    said = ", ".join(f"{n} {r}" for r, n in sorted(summary.reasons.items()) if n)
    print(f"dry run: {summary.counts['videos_listed']} listed ({said or 'none'}): {len(planned.videos)} to process, "
          f"{skipped} to skip, {len(summary.missing)} to mark missing; nothing was run or written", file=sys.stderr)
    for warning in summary.warnings:
        print(f"vidlens: warning: {warning}", file=sys.stderr)
    return 0


def _ended_summary(exc: BaseException, args: argparse.Namespace) -> RunSummary:
    """The summary of a run that ended before its end: stopped (SIGTERM, Ctrl-C), or failed as a
    whole (its error, the exit code it ends with); what it did up to then where it had started."""
    summary = getattr(exc, "run_summary", None) or RunSummary(run_id="", source=args.source, output=args.out,
                                                               run_date=args.run_date or "")
    stop = _stop_code()
    if stop is not None or isinstance(exc, (SystemExit, KeyboardInterrupt)):
        summary.status = "stopped"
        if stop is not None:
            summary.ended_with = stop
        elif isinstance(exc, KeyboardInterrupt):
            summary.ended_with = 128 + signal.SIGINT
        else:
            summary.ended_with = exc.code if isinstance(exc.code, int) else 1
    else:
        said = _said(exc, args) if isinstance(exc, Exception) else None
        summary.status = "error"
        summary.error = said or redact(f"{type(exc).__name__}: {exc}")
        summary.ended_with = 2 if said is not None and not args.verbose else 1  # (a bug: its traceback)
    return summary


def _write_summary(path: str, summary: RunSummary) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(summary.to_json())
    except OSError as exc:  # the run's outcome stands: its exit code says it, not this
        print(f"vidlens: warning: --summary-json {path}: not written: {exc.strerror or exc}", file=sys.stderr)


def _forget(args: argparse.Namespace) -> int:
    from pipeline.forget import forget
    from pipeline.results_cli import storage_options

    if not args.uris and not args.missing:
        raise ValueError("vidlens forget: name the videos' URIs (as in videos.uri), or give --missing")
    done = forget(args.out, args.uris, args.missing, storage_options(args))
    for uri in done.unknown:
        print(f"vidlens: warning: {uri} is not in {args.out} (give URIs as videos.uri has them)", file=sys.stderr)
    for uri in done.already:
        print(f"{uri} was forgotten already in {args.out}")
    if done.finished:
        print(f"finished {counted(done.finished, 'forget')} killed midway in {args.out}")
    if not done.videos:
        if not done.already and not done.finished:
            print(f"nothing to forget in {args.out}" + (": the ledger marks no video missing" if args.missing else ""))
        # an earlier forget's URI is done, not mistyped: running a killed forget again succeeds
        return 2 if done.unknown and not done.already else 0
    print(f"forgot {counted(done.videos, 'video')} in {args.out}: {counted(done.rows_removed, 'row')} removed "
          f"from {counted(done.files_rewritten, 'file')}, "
          f"{'its ledger entry' if done.videos == 1 else 'their ledger entries'} dropped from the ledger and "
          f"{counted(done.manifests_scrubbed, 'manifest')}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from pipeline.schedule import Schedule, install_cron, install_systemd

    schedule = Schedule(args.source, args.out, args.at, args.submit, args.config, args.log_dir)
    schedule.check()
    if args.systemd:
        for name, text in schedule.systemd_units().items():
            print(f"# {name}\n{text}")
    else:
        print(schedule.cron_entry())
    if args.install:
        print(install_systemd(schedule) if args.systemd else install_cron(schedule), file=sys.stderr)
    return 0


if __name__ == "__main__":  # `python -m pipeline.cli`: as `vidlens` and `python -m pipeline` exit
    command()
