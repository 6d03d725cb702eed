"""The `vidlens` command line (also `python -m pipeline`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

from pipeline import command_stops, failure_lines, ray_relayed, stop_deadline
from pipeline.arguments import build_parser, check_path_arguments, check_run_date_argument, config_from_args
from pipeline.log_relay import LOG_FORMAT, OneLineFormatter
from pipeline.results_cli import COMMANDS as RESULTS_COMMANDS
from pipeline.results_cli import run_command as run_results_command
from pipeline.submit import COMMANDS as SUBMIT_COMMANDS
from pipeline.summary import RunSummary, counted, printable
from pipeline.submit import run_command as run_submit_command
from schemas.config import RunConfig
from workers.redaction import install_log_redaction, print_redacted_traceback, redact, register_secrets


def command() -> None:
    """The `vidlens` command (and `python -m pipeline`): `main`, its exit code the process's.

    A run that stopped (SIGTERM, Ctrl-C) or failed while a model stage's thread was inside
    torch left that thread running, as it ends only between batches. Python ends such threads
    at its exit where they are, and through torch's C++ code that is std::terminate
    ("terminate called without an active exception"): exit 134, not 143, 130 or 2. Once
    `main` has returned (the run's cleanup done: its lock given back, its workers stopped),
    the process then exits at once, its output flushed; so it does where a stop's cleanup left a
    request to the output's store running (`command_stops.exit_at_once`). A stop that comes as
    the process exits leaves its exit code as the command's (`command_stops.keep_the_exit_code`,
    `command_stops.ignore_stops_at_the_end`).
    """
    sys.excepthook = print_redacted_traceback  # a traceback that ends the process shows no secret either
    command_stops.ignore_stops_at_the_end()
    try:
        code = main()
    except BaseException as exc:
        code = command_stops.exit_code_of(exc)
        command_stops.keep_the_exit_code(code)
        if not command_stops.exit_at_once():
            raise
        if code == 1 and not isinstance(exc, SystemExit):  # a bug: its traceback, as Python would print it
            print_redacted_traceback(type(exc), exc, exc.__traceback__)
    else:
        command_stops.keep_the_exit_code(code)
    if command_stops.exit_at_once():
        command_stops.flush_and_exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 3 some videos failed, 2 failed, 141 stdout
    closed, 143 stopped by SIGTERM, 130 by Ctrl-C; a run that a stop found at its end goes on to
    it, and exits with its own code). The Ray its run started or joined is shut down however it
    ends, a run's before its last word; a Ray this process was connected to otherwise (its caller's,
    `main` used as a library) stays connected (`command_stops.shut_ray_down`)."""
    # a note on this thread from before the command (`pipeline.job.run_job` run by the caller, which leaves
    # its Ray up) is the caller's connection, not this command's: kept, the command shut that Ray down
    ray_cluster = sys.modules.get("pipeline.ray_cluster")
    if ray_cluster is not None:
        ray_cluster.disconnected()
    try:
        with command_stops.handling_stops():
            try:
                code = _main(argv)
            except KeyboardInterrupt:  # Ctrl-C's, once its cleanup ran: the exit code, not a traceback
                if not command_stops.STOPPED:
                    raise
                code = command_stops.STOPPED[0]
            stopped = command_stops.stop_code()
    except BaseException as exc:  # (a stop's own failure, a Ctrl-C before any stop was recorded)
        command_stops.shut_ray_down(command_stops.exit_code_of(exc))
        raise
    code = code if stopped is None else stopped
    command_stops.shut_ray_down(code)  # (`vidlens doctor`'s; a run's was shut down before its last word)
    return code


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
    console = logging.StreamHandler()
    console.setFormatter(OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[console])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    install_log_redaction()
    try:
        check_run_date_argument(args)
        check_path_arguments(args)
        if args.command == "run":
            return _run(args)
        if args.command == "schedule":
            return _schedule(args)
        if args.command == "compact":
            from pipeline.compact import compact
            from pipeline.results_cli import storage_options

            with _stop_said(f"compacting {args.out}", "what every view shows is as it was; run the same command "
                            "again to compact it"):
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
            with _stop_said(f"forgetting videos in {args.out}", "run the same command again to finish it"):
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
        stop = command_stops.stop_code()
        if stop is not None:  # a failure of the stop (its exception lost, see command_stops.STOPPED): not an error
            raise SystemExit(stop) from None
        said = failure_lines.said_of(exc, args)
        # Ray's last lines (a killed node's notes, its workers' lines in flight) before the error line or
        # the traceback (-v, or a bug's, exit 1: printed as the exception leaves `command`), not after
        # them, as before a summary: a failed run on Ray waits for them and shuts Ray down (its summary
        # file written already), a local run neither waits nor imports Ray
        command_stops.shut_ray_down(2 if said is not None and not args.verbose else 1, settle=ray_relayed.settle)
        if args.verbose or said is None:
            raise
        print(f"vidlens: error: {said}", file=sys.stderr)
        return 2
    return 2


def _run(args: argparse.Namespace) -> int:
    from pipeline.job import run_job

    config = config_from_args(args)
    register_secrets(config.storage, failure_lines.stores_reached(args))  # hidden from every log line and message from here on
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
        if stop_deadline.LEFT:  # (its watcher reads what the stopped line says it left)
            ended.warnings.append(stop_deadline.left_said())
        if args.summary_json:
            _write_summary(args.summary_json, ended)
        if ended.status == "stopped":  # (its cleanup done, the workers ended; on the store, in `stop_deadline`'s time)
            run = f"run {ended.run_id}" if ended.run_id else "the run"
            stop = command_stops.STOP_NAMES.get(ended.exit_code, "exit")
            try:
                # Ray's last lines (its shutdown's, a worker's in flight) before the stopped line, which is
                # the command's last word as a summary is; a second stop meanwhile ends it at once with
                # its 143 or 130. Not `settle` first, as before a summary (up to a second more): a user who
                # stopped the run wants out, and the shutdown ends Ray's relaying (a line still in flight
                # is lost, not printed after this one), so the stop waits for the shutdown alone, which
                # the exit did after this line before
                command_stops.shut_ray_down(ended.exit_code)
            finally:
                left = stop_deadline.left_said()
                print(f"vidlens: {run} stopped ({stop}): the batches it published stay; the same command goes on from "
                      f"there{'. ' + left if left else ''}", file=sys.stderr)
        raise
    _note_a_stop_let_go(summary)
    if args.summary_json:  # (before Ray's shutdown, which a second stop ends with the process at once)
        _write_summary(args.summary_json, summary)
    # Ray's last lines (its workers' lines in flight, a killed node's death noticed late) before the
    # summary, not after it: once shut down, as the exit would do next, Ray prints nothing more
    ray_relayed.settle()
    command_stops.shut_ray_down(summary.exit_code)
    print(summary.render())
    return summary.exit_code


def _note_a_stop_let_go(summary: RunSummary) -> None:
    """A warning in the summary where the first stop came as the run was at its end, and it went on
    to it (`command_stops.LET_GO`): why a run that was stopped says it succeeded (or failed), and exits so."""
    if command_stops.LET_GO.is_set():
        stop = command_stops.STOP_NAMES.get(command_stops.STOPPED[0], "a stop")
        summary.warnings.append(f"{stop} came as the run was publishing its last batch: it finished that rather "
                                "than stop")


def _dry_run(args: argparse.Namespace, config: RunConfig) -> int:
    """`vidlens run --dry-run`: each video the run would process, with its decision, each it would
    give up on and each it would mark missing, a line each on standard output; the counts and
    warnings on standard error."""
    from pipeline.job import dry_run
    from pipeline.run_listing import LISTING_LOGGERS

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
        print(f"{reason}\t{_line_field(uri)}")
    for uri in summary.given_up:  # (skipped, but each is a file to fix or replace: named)
        print(f"given up\t{_line_field(uri)}")
    for uri in summary.missing:
        print(f"missing\t{_line_field(uri)}")
    skipped = summary.counts["videos_listed"] - len(planned.videos)
    said = ", ".join(f"{n} {r}" for r, n in sorted(summary.reasons.items()) if n)
    print(f"dry run: {summary.counts['videos_listed']} listed ({said or 'none'}): {len(planned.videos)} to process, "
          f"{skipped} to skip, {len(summary.missing)} to mark missing; nothing was run or written", file=sys.stderr)
    for warning in summary.warnings:
        print(f"vidlens: warning: {printable(warning)}", file=sys.stderr)  # (a warning may name a URI)
    return 0


def _line_field(uri: str) -> str:
    """A URI as a dry run's line has it: as it is, or as a JSON string (in double quotes, escaped,
    ASCII: `json.loads` reads it back) where it holds a character that would end the line or its
    field (a newline, a tab, any control character or line separator), or starts with a quote."""
    import json
    import unicodedata

    if uri.startswith('"') or any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in uri):
        return json.dumps(uri)
    return uri


def _ended_summary(exc: BaseException, args: argparse.Namespace) -> RunSummary:
    """The summary of a run that ended before its end: stopped (SIGTERM, Ctrl-C), or failed as a
    whole (its error, the exit code it ends with); what it did up to then where it had started."""
    summary = getattr(exc, "run_summary", None) or RunSummary(run_id="", source=args.source, output=args.out,
                                                               run_date=args.run_date or "")
    stop = command_stops.stop_code()
    if stop is not None or isinstance(exc, (SystemExit, KeyboardInterrupt)):
        summary.status = "stopped"
        if stop is not None:
            summary.ended_with = stop
        elif isinstance(exc, KeyboardInterrupt):
            summary.ended_with = 128 + signal.SIGINT
        else:
            summary.ended_with = exc.code if isinstance(exc.code, int) else 1
    else:
        said = failure_lines.said_of(exc, args) if isinstance(exc, Exception) else None
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


@contextlib.contextmanager
def _stop_said(what: str, then: str) -> Iterator[None]:
    """Say on stderr that `what` stopped (SIGTERM, Ctrl-C), and `then` what to do: a stopped compact or
    forget exited 143 or 130 without a word (chaos soak on az:// and gs://, 2026-12-07), where a stopped
    run says what stays and that the same command goes on."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        stop = command_stops.stop_code()
        if stop is not None:
            left = stop_deadline.left_said()  # (the lock, where the store did not answer)
            print(f"vidlens: {what} stopped ({command_stops.STOP_NAMES.get(stop, 'exit')}): {then}"
                  f"{'. ' + left if left else ''}", file=sys.stderr)
        raise


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
