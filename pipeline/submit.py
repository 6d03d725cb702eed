"""Running `vidlens run` as a Ray job on an existing cluster: submit, follow, status, stop.

`vidlens submit SOURCE --out OUT --address http://HEAD:8265` ships this project (not its
virtual environment, caches or outputs) as the job's working directory and runs
`python -m pipeline run SOURCE --out OUT` on the cluster. The submission id is derived
from the source, the output, the configuration's fingerprint and the run date, so
submitting the same batch again finds the job already there and follows it instead of
starting a second one; after a failed or stopped job, a resubmit starts a numbered retry.

Credentials never travel with the job: the configuration shipped has its storage secrets
removed, and the cluster's own environment (AWS_*, GOOGLE_*, AZURE_*, instance roles)
provides them to every process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, TextIO

from pipeline.ray_cluster import FORWARDED_ENV, PROJECT_ROOT
from schemas.config import SUBMITTED_CONFIG_ENV, RunConfig
from schemas.secrets import SECRET_STORAGE_KEYS, is_secret_option, url_userinfo
from workers.redaction import redact, register_secrets

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
#: never uploaded with the job: environments, version control, caches, outputs, media, weights, and
#: the checkout's tests and docs (1.7 of the 2.8 MB it sent: Ray zips without compressing).
EXCLUDES = [
    ".venv", "venv", ".git", "**/__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", ".mypy_cache",
    "**/.cache", "*.egg-info", "bench", "out", "outputs", "models", "*.mp4", "*.mov", "*.mkv", "*.webm", "*.avi",
    "*.parquet", "*.safetensors", "*.bin", "*.onnx", "*.pt", "/tests", "/docs",
]
ACTIVE = {"PENDING", "RUNNING"}
#: a job whose run finished with some videos failed (`vidlens run` exit 3), which Ray calls
#: FAILED: done for the night, as such a local run is (the failed videos are retried the next)
PARTIAL = "PARTIAL"
DONE = {"SUCCEEDED", PARTIAL}
#: tries, 2 s apart, while a freshly started cluster has no job agent yet.
_AGENT_WAIT_ATTEMPTS = 60


#: vidlens' packages: what a job of an installed vidlens is sent (`runtime_env`).
PACKAGES = ("pipeline", "workers", "schemas")


class SubmitError(RuntimeError):
    """The cluster could not be reached or refused the job; the message says what to check."""


@dataclass(frozen=True)
class Submission:
    """What `vidlens submit` decided: the job id, and whether it started a new job."""

    job_id: str
    submitted: bool
    status: str


def submission_id(source: str, out: str, config: RunConfig, run_date: str | None = None, full: bool = False,
                  retry_failed: bool = False) -> str:
    """`vidlens-<16 hex>`: the same batch (source, output, results-relevant config, date, and
    whether `--full` or `--retry-failed`) gets the same id. (A --full resubmit had the id of the
    night's batch, found done: nothing was reprocessed.)"""
    body = json.dumps([source.rstrip("/"), out.rstrip("/"), config.fingerprint(), run_date or "",
                       *(["full"] if full else []), *(["retry-failed"] if retry_failed else [])])
    return "vidlens-" + hashlib.sha256(body.encode()).hexdigest()[:16]


def shipped_config(config: RunConfig) -> dict[str, Any]:
    """The configuration as the job receives it: storage secrets removed, executor set to Ray."""
    body = as_shipped(config).to_dict()
    storage = body["storage"]
    for name in SECRET_STORAGE_KEYS:
        storage[name] = None
    storage["options"] = _without_secrets(storage["options"])
    storage["endpoint_url"] = _without_password(storage["endpoint_url"])
    return body


def _without_password(endpoint: str | None) -> str | None:
    """An endpoint URL without the user name and password it names (http://user:password@host), which
    would show in the job's runtime environment on the Ray dashboard, as a key would."""
    userinfo = url_userinfo(endpoint)
    return endpoint if userinfo is None else endpoint.replace(
        f"{userinfo[0]}:{userinfo[1]}@" if userinfo[1] is not None else f"{userinfo[0]}@", "", 1)


def as_shipped(config: RunConfig) -> RunConfig:
    """The configuration the job runs with (`shipped_config`, less its secrets), to check as the
    cluster will: on the Ray executor, whatever `resources.executor` a config tried locally says;
    inside a Ray job, ray.init() joins the job's cluster (RAY_ADDRESS is set for it)."""
    return replace(config, resources=replace(config.resources, executor="ray", ray_address=None))


def _without_secrets(options: Any) -> Any:
    """Storage options with every secret-named key removed, at any depth: s3fs takes keys in
    `client_kwargs` (aws_secret_access_key), which went to the cluster as they were."""
    if isinstance(options, dict):
        return {k: _without_secrets(v) for k, v in options.items() if not is_secret_option(str(k))}
    if isinstance(options, list):
        return [_without_secrets(v) for v in options]
    return options


def runtime_env(config: RunConfig, pip: list[str] | None = None, working_dir: str = PROJECT_ROOT) -> dict[str, Any]:
    """The job's runtime environment: this project, the shipped config, optional pip packages.

    A source checkout (a pyproject.toml beside the packages) goes as the job's working folder;
    an installed vidlens as its three packages (`py_modules`): the folder above them is then
    site-packages, gigabytes over Ray's 512 MiB limit for a job's files."""
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    env_vars[SUBMITTED_CONFIG_ENV] = json.dumps(shipped_config(config), sort_keys=True)
    env: dict[str, Any] = {"env_vars": env_vars}
    if os.path.isfile(os.path.join(working_dir, "pyproject.toml")):
        env.update(working_dir=working_dir, excludes=list(EXCLUDES))
    else:
        env["py_modules"] = [os.path.join(working_dir, package) for package in PACKAGES]
    if pip:
        env["pip"] = list(pip)
    return env


def entrypoint(source: str, out: str, run_date: str | None = None, full: bool = False,
               retry_failed: bool = False) -> str:
    """The shell command the job runs on the cluster's head node."""
    command = ["python", "-m", "pipeline", "run", source, "--out", out, "--config-env", SUBMITTED_CONFIG_ENV,
               "--no-progress"]
    if run_date:
        command += ["--run-date", run_date]
    if full:
        command.append("--full")
    if retry_failed:
        command.append("--retry-failed")
    return shlex.join(command)


def connect(address: str | None) -> Any:
    """A `JobSubmissionClient` for the cluster's dashboard address (or RAY_ADDRESS, or loopback)."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection, auth or version problems: one clear line
        said = redact(next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__))
        if "Authentication" in type(exc).__name__ or "Authentication" in said:
            raise SubmitError(
                f"the Ray job server at {address} refused the request ({said}): set RAY_AUTH_MODE=token and "
                f"the cluster's token as RAY_AUTH_TOKEN or in the file RAY_AUTH_TOKEN_PATH names (a nightly "
                f"job sees neither your shell's RAY_AUTH_TOKEN nor, unless set then, RAY_AUTH_MODE)"
            ) from None
        raise SubmitError(
            f"cannot reach the Ray job server at {address} ({type(exc).__name__}: {said}); "
            f"check the address (the dashboard port, 8265 by default), that the cluster runs "
            f"ray[default], and that RAY_AUTH_MODE/RAY_AUTH_TOKEN match the cluster's"
        ) from None


def job_status(client: Any, job_id: str) -> str | None:
    """The job's status name (`PARTIAL` for a run that exited 3), or None when the cluster has
    no job with this id."""
    try:
        status = str(client.get_job_status(job_id).value)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc) or "not found" in str(exc).lower():
            return None
        raise
    if status == "FAILED" and getattr(client.get_job_info(job_id), "driver_exit_code", None) == 3:
        return PARTIAL
    return status


def submit(client: Any, source: str, out: str, config: RunConfig, *, run_date: str | None = None,
           full: bool = False, retry_failed: bool = False, pip: list[str] | None = None,
           working_dir: str = PROJECT_ROOT, stream: TextIO | None = None) -> Submission:
    """Submit the batch unless the same batch is already pending, running or done; say which
    (on `stream`, standard error by default)."""
    stream = stream or sys.stderr
    if run_date is not None:
        from pipeline.output_checks import check_run_date

        check_run_date(run_date)  # before the cluster spends a job on it
    base = submission_id(source, out, config, run_date, full, retry_failed)
    job_id, status = base, job_status(client, base)
    attempt = 0
    while status is not None and status not in ACTIVE and status not in DONE:
        attempt += 1  # failed or stopped: the next free retry id
        job_id = f"{base}-retry{attempt}"
        status = job_status(client, job_id)
    if status is not None:
        print(f"job {job_id} was already submitted for this batch and is {status}: not submitting it again",
              file=stream)
        return Submission(job_id, False, status)
    if attempt:
        print(f"job {base} failed or was stopped earlier: submitting retry {attempt} as {job_id}", file=stream)
    print(f"job id {job_id}", file=stream)  # (the retry's, not the failed one's: said once it is known)
    request = dict(
        entrypoint=entrypoint(source, out, run_date, full, retry_failed),
        submission_id=job_id,
        runtime_env=runtime_env(config, pip, working_dir),
        metadata={"vidlens_source": source, "vidlens_out": out, "config_fingerprint": config.fingerprint()},
    )
    for attempt in range(_AGENT_WAIT_ATTEMPTS):
        try:
            if attempt and job_status(client, job_id) is not None:
                break  # the cluster took the job before it dropped the connection of an earlier try
            client.submit_job(**request)
            break
        except (RuntimeError, OSError) as exc:
            # a cluster that has just started has no job agent yet, and may drop a connection
            # while it starts one (requests' ConnectionError is an OSError): wait for it
            starting = isinstance(exc, OSError) or "No available agent" in str(exc)
            if not starting or attempt == _AGENT_WAIT_ATTEMPTS - 1:
                raise
            time.sleep(2.0)
    print(f"submitted job {job_id}: {source} -> {out}", file=stream)
    return Submission(job_id, True, "PENDING")


def follow(client: Any, job_id: str, stream: TextIO | None = None) -> str:
    """Stream the job's logs (to standard output by default) until it ends; returns its final status."""
    stream = stream or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            stream.write(redact(lines))
            stream.flush()

    asyncio.run(tail())
    return wait(client, job_id)


def follow_until_left(client: Any, job_id: str) -> str:
    """`follow`, saying where a stop of this command (Ctrl-C, SIGTERM) leaves the job: it only stops
    the following, and the job goes on (the command had ended with exit 130 and not a word)."""
    try:
        return follow(client, job_id)
    except (KeyboardInterrupt, SystemExit):
        print(f"stopped following job {job_id}, which goes on on the cluster: `vidlens status {job_id} --follow` "
              f"follows it again, `vidlens stop {job_id}` stops it", file=sys.stderr)
        raise


def wait(client: Any, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Poll until the job is no longer pending or running; returns its final status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = job_status(client, job_id) or "UNKNOWN"
        if status not in ACTIVE or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def describe(client: Any, job_id: str, last_lines: int = 20) -> str:
    """The job's status, message and the last lines of its log, as `vidlens status` prints them."""
    status = job_status(client, job_id)
    if status is None:
        return missing_job(job_id)
    info = client.get_job_info(job_id)
    lines = [status_line(job_id, status)]
    metadata = getattr(info, "metadata", None) or {}
    if metadata.get("vidlens_source"):
        lines.append(f"  {metadata['vidlens_source']} -> {metadata.get('vidlens_out', '?')}")
    message = (getattr(info, "message", None) or "").split(", last available logs")[0].strip()
    if message and status != PARTIAL:
        lines.append(f"  {message}")  # (Ray's message repeats the log's last lines: they follow)
    log = client.get_job_logs(job_id).splitlines()[-last_lines:] if last_lines > 0 else []
    if log:
        lines.append(f"  last {len(log)} log lines:")
        lines += [f"    {line}" for line in log]
    return redact("\n".join(lines))


def exit_code(status: str) -> int:
    """As `vidlens run`'s: 0 for a succeeded job, 3 for one whose run had videos fail, 2 for
    anything else (failed, stopped, unknown)."""
    return {"SUCCEEDED": 0, PARTIAL: 3}.get(status, 2)


def status_line(job_id: str, status: str) -> str:
    said = ": finished, some videos failed (their rows are in the errors table)" if status == PARTIAL else ""
    return f"job {job_id}: {status}{said}"


def absolute_local_paths(config: RunConfig) -> RunConfig:
    """The configuration with its relative paths that exist here made absolute (model folders,
    the queries file, the model cache), as the source's and output's are: the job runs in the
    uploaded project, where a relative one would start. Hub ids ("openai/clip-vit-base-patch32")
    are left as they are, unless a folder of that name is here."""
    paths = {"models.embed": config.models.embed, "models.captions": config.models.captions,
             "models.cache_dir": config.models.cache_dir, "match.queries_file": config.match.queries_file}
    local = {name: os.path.abspath(value) for name, value in paths.items()
             if value and "://" not in value and not os.path.isabs(value) and os.path.exists(value)}
    return config.with_overrides(local) if local else config


def missing_job(job_id: str) -> str:
    return f"no job {job_id} on this cluster (list them with `ray job list`)"


# --- the command line: vidlens submit / status / stop ------------------------------------

COMMANDS = ("submit", "status", "stop")


def add_commands(commands: Any) -> None:
    """Add `submit`, `status` and `stop` to the `vidlens` subcommands."""
    from pipeline.arguments import add_config_arguments

    address_help = f"the cluster's job server (dashboard) address (default: RAY_ADDRESS or {DEFAULT_ADDRESS})"
    submit_parser = commands.add_parser("submit", help="run `vidlens run` as a Ray job on a cluster")
    submit_parser.add_argument("source", help="a bucket URL or manifest the cluster can read (or a path on its nodes)")
    submit_parser.add_argument("--out", required=True, help="output bucket URL (or a path shared by the nodes)")
    submit_parser.add_argument("--address", help=address_help)
    add_config_arguments(submit_parser)
    submit_parser.add_argument("--run-date", metavar="YYYY-MM-DD",
                               help="the run_date partition (default today, UTC); part of the job id, so a "
                                    "nightly submit starts one job a night and a resubmit the same day follows it")
    submit_parser.add_argument("--full", action="store_true", help="reprocess every video (see vidlens run --full)")
    submit_parser.add_argument("--retry-failed", action="store_true",
                               help="also run the videos given up on (see vidlens run --retry-failed)")
    submit_parser.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                               help="pip requirement to install in the job's environment, for clusters that "
                                    "lack vidlens' dependencies (repeatable)")
    submit_parser.add_argument("--no-follow", action="store_true", help="return once submitted; don't stream logs")
    for name, help_text in (("status", "print a job's status and the last lines of its log"),
                            ("stop", "stop a running job")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("job_id", help="the id `vidlens submit` printed (vidlens-...)")
        sub.add_argument("--address", help=address_help)
        if name == "status":
            sub.add_argument("--follow", action="store_true", help="stream the log until the job ends")
            sub.add_argument("--lines", type=int, default=20, help="log lines to print (default 20)")


def refuse_run_only_flags(args: Any) -> None:
    """`vidlens run`'s flags that a submitted job cannot follow (`as_shipped`), which `submit` takes
    with the other run settings: `--ray-address http://HEAD:8265` was dropped, and the job went to
    RAY_ADDRESS or 127.0.0.1:8265 ("cannot reach" a server the user never named, or another cluster);
    `--executor local` ran the job on Ray all the same."""
    if getattr(args, "ray_address", None):
        raise SubmitError(f"--ray-address {args.ray_address}: vidlens submit sends its job to a cluster's job "
                          f"server, given as --address (http://HEAD:8265); --ray-address is vidlens run's, to "
                          f"join a cluster at its head node's HOST:6379")
    if getattr(args, "executor", None) == "local":
        raise SubmitError("--executor local: a submitted job runs on the cluster's Ray; to run without Ray, "
                          "run vidlens run --executor local on one machine instead")


def run_command(args: Any) -> int:
    """Run `submit`, `status` or `stop`; returns the process exit code."""
    from pipeline.ray_cluster import quiet_ray_logs

    quiet_ray_logs()
    if args.command != "submit" and ("/" in args.job_id or os.path.isdir(args.job_id)):
        # an output (`vidlens status OUT`), where the job server's connection error said nothing of it
        raise SubmitError(f"{args.job_id} is not a job id: vidlens {args.command} takes the id vidlens submit "
                          "printed (vidlens-...); an output's runs are in its runs table: vidlens query "
                          f"{args.job_id} \"select run_id, status, started_at from runs order by started_at desc\"")
    if args.command == "submit":  # its configuration checked before the cluster is reached
        from pipeline.arguments import config_from_args

        refuse_run_only_flags(args)
        from pipeline.resource_settings import check_resources

        config = absolute_local_paths(config_from_args(args))
        register_secrets(config.storage)
        check_resources(as_shipped(config))  # (else said by the job, on the cluster)
    client = connect(args.address)
    if args.command == "submit":
        # dated like `vidlens run`'s partitions: without it every night would find last night's job done
        args.run_date = args.run_date or datetime.now(timezone.utc).date().isoformat()
        # a local path means the same path on the cluster's nodes, never one inside the uploaded project
        args.source, args.out = (a if "://" in a else os.path.abspath(a) for a in (args.source, args.out))
        storage = config.storage
        if any(getattr(storage, name) for name in SECRET_STORAGE_KEYS) or url_userinfo(storage.endpoint_url):
            print("note: storage credentials in the configuration (an endpoint's user name and password too) are "
                  "not sent to the cluster; set them in the cluster's environment (see docs/cluster.md)",
                  file=sys.stderr)
        submission = submit(client, args.source, args.out, config, run_date=args.run_date, full=args.full,
                            retry_failed=args.retry_failed, pip=args.pip or None)
        if args.no_follow:
            print(submission.job_id)
            return 0
        status = follow_until_left(client, submission.job_id) if submission.status in ACTIVE else submission.status
        print(status_line(submission.job_id, status), file=sys.stderr)
        return exit_code(status)
    known = job_status(client, args.job_id)
    if known is None:  # (status and stop)
        raise SubmitError(missing_job(args.job_id))
    if args.command == "status":
        followed = args.follow and known in ACTIVE
        if followed:
            follow_until_left(client, args.job_id)
        print(describe(client, args.job_id, 0 if followed else args.lines))  # (the log was just streamed)
        status = job_status(client, args.job_id) or "UNKNOWN"
        return 0 if status in ACTIVE else exit_code(status)
    stopped = client.stop_job(args.job_id)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0
