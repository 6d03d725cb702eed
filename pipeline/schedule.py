"""`vidlens schedule`: a cron entry or a systemd timer that runs the incremental job every night.

The entry calls this installation's own `vidlens` by its absolute path, appends its output
to a log file and writes each run's summary as JSON next to it. The job's lock makes an
overlapping start exit with code 2; the exit codes tell the scheduler success (0), partial
success (3: some videos failed, retried the next night) and failure (2) apart.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.sources import as_listed, is_remote


#: the environment's settings that say where a run reads from (the model cache, offline or not,
#: the cluster, a bucket's profile and endpoint, how the job server is reached), written into the
#: nightly line. Secrets never are: the files that hold them are named instead (`SECRETS`).
#: (XDG_CACHE_HOME: the hub's cache and the text banks are under it where HF_HOME and
#: VIDLENS_CACHE_DIR are not set; cron and systemd's user units start without it.)
CARRIED = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "VIDLENS_CACHE_DIR",
           "XDG_CACHE_HOME", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "AWS_PROFILE", "AWS_CONFIG_FILE",
           "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
           "GOOGLE_APPLICATION_CREDENTIALS")
#: secrets set where `schedule` ran that the nightly job will not have, and where it finds them instead
SECRETS = {
    "RAY_AUTH_TOKEN": "keep the token in ~/.ray/auth_token, or in a file named by RAY_AUTH_TOKEN_PATH (set it "
                      "when you run `vidlens schedule`)",
    "AWS_ACCESS_KEY_ID": "keep the keys in ~/.aws/credentials (AWS_PROFILE picks a profile of it), or in the "
                         "--config file's storage section (key, secret)",
    "AWS_SECRET_ACCESS_KEY": "keep the keys in ~/.aws/credentials (AWS_PROFILE picks a profile of it), or in the "
                             "--config file's storage section (key, secret)",
    "AWS_SESSION_TOKEN": "a session token expires: use a profile of ~/.aws/credentials or an instance role",
    "HF_TOKEN": "keep the token in the Hugging Face cache (`hf auth login`), where HF_HOME points",
    "AZURE_STORAGE_KEY": "name it in the config's storage section, or use a managed identity",
    "AZURE_STORAGE_CONNECTION_STRING": "name it in the config's storage section, or use a managed identity",
    "AZURE_STORAGE_SAS_TOKEN": "name it in the config's storage section, or use a managed identity",
}


@dataclass(frozen=True)
class Schedule:
    """What to run, when, and where its log and summaries go."""

    source: str
    out: str
    at: str = "02:00"
    submit_address: str | None = None
    config: str | None = None
    log_dir: str | None = None
    #: the folder the nightly command runs in: where `vidlens schedule` ran
    folder: str = field(default_factory=os.getcwd)
    #: the settings of `CARRIED` as set where `schedule` ran (cron and systemd do not see the
    #: shell's variables): the nightly job reads the models, buckets and cluster it was checked with
    environment: dict[str, str] = field(default_factory=lambda: {
        name: os.environ[name] for name in CARRIED if name in os.environ})

    @property
    def name(self) -> str:
        """A stable name for the source and output the command runs on: a schedule installs once
        however its paths are written, and the same relative paths given in two folders are two."""
        # as `command` names them: as typed, `videos` in two projects was one name
        source, out = as_listed(self.source), as_listed(self.out)
        digest = hashlib.sha256(f"{source}\n{out}".encode()).hexdigest()[:10]
        return f"vidlens-{digest}"

    def hour_minute(self) -> tuple[int, int]:
        """The time of day, checked."""
        match = re.fullmatch(r"(\d{1,2}):(\d{2})", self.at)
        if not match or int(match[1]) > 23 or int(match[2]) > 59:
            raise ValueError(f"--at {self.at!r}: give a time of day as HH:MM, e.g. 02:00")
        return int(match[1]), int(match[2])

    def check(self) -> None:
        """Refuse, now rather than every night, a time of day, a local source, an output or log
        folder or a config file that would fail each run; note the secrets the nightly job will
        not have."""
        self.hour_minute()
        from pipeline.output_checks import check_folder_path, check_writable_folder
        from pipeline.sources import check_local_source

        check_local_source(self.source)  # (a mistyped folder failed every night)

        if not is_remote(self.out):
            check_folder_path(self.out, f"output {self.out!r}")  # as `vidlens run` refuses it
            check_writable_folder(self.out, f"output {self.out!r}")
        logs = f"log folder {self.log_dir or str(self.logs())!r} (--log-dir)"
        check_folder_path(self.log_dir or str(self.logs()), logs, bucket_ok=False, made_by="each night's run")
        check_writable_folder(self.log_dir or str(self.logs()), logs)  # (the nightly line's log went nowhere)
        if self.submit_address and not re.match(r"[a-z]+://[^/]", self.submit_address, re.IGNORECASE):
            raise ValueError(f"--submit {self.submit_address!r}: give the Ray job server's URL, e.g. "
                             "http://head-node:8265")
        given: set[str] = set()  # secrets the config file gives the nightly job itself
        if self.config:
            from schemas.config import ConfigError, RunConfig

            if Path(self.config).is_dir():  # (not "no such file": it is there, a folder)
                raise ConfigError(f"--config {self.config} is a folder: give the YAML or TOML file in it")
            if not Path(self.config).is_file():
                raise ConfigError(f"--config {self.config}: no such file (the nightly runs would read "
                                  f"{Path(self.config).absolute()}): give an existing YAML or TOML configuration")
            from pipeline.resource_settings import PlanError, check_resources

            try:  # a typo in it fails here, naming the file and key
                config = RunConfig.from_file(self.config)
                if self.submit_address:  # (the cluster's job runs it on Ray)
                    from pipeline.submit import as_shipped

                    config = as_shipped(config)
                check_resources(config)
            except PlanError as exc:
                raise PlanError(f"--config {self.config}: {exc}") from None
            if not self.submit_address:  # (a cluster's nodes read their own folders)
                from workers.model_sources import missing_model_folder

                for role, model in (("embed", config.models.embed), ("captions", config.models.captions)):
                    wrong = config.runs(role) and missing_model_folder(model, role, written_as_path=True)
                    if wrong:  # (the nightly runs start in this folder: a relative path means here)
                        raise ConfigError(f"--config {self.config}: {wrong}")
                if config.enabled("match"):  # (each run reads it before any video; a run without match does not)
                    try:
                        config.all_queries()
                    except ConfigError as exc:
                        raise ConfigError(f"--config {self.config}: {exc}") from None
                if config.storage.key and config.storage.secret:  # (`submit` sends no credential)
                    given |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        for name, instead in SECRETS.items():
            if name in os.environ and name not in given and not (
                    name == "RAY_AUTH_TOKEN" and "RAY_AUTH_TOKEN_PATH" in self.environment):
                print(f"note: the nightly job will not see {name} (a secret is not written into the schedule): "
                      f"{instead}", file=sys.stderr)

    def logs(self) -> Path:
        """The local folder of the log file and the run summaries."""
        if self.log_dir:
            return Path(self.log_dir).absolute()
        base = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
        return base / "vidlens" / self.name

    def command(self) -> list[str]:
        """The command the scheduler runs (arguments, absolute paths)."""
        # no "..": the nightly line names the source as the listing names its videos
        source, out = as_listed(self.source), as_listed(self.out)
        config = ["--config", str(Path(self.config).absolute())] if self.config else []
        if self.submit_address:
            return [*vidlens_executable(), "submit", source, "--out", out, "--address", self.submit_address, *config]
        return [*vidlens_executable(), "run", "--incremental", source, "--out", out, "--no-progress", *config]

    def shell_line(self, cron: bool = False) -> str:
        """The command as one shell line, run in the folder `schedule` was run in, with its
        output appended to the log file."""
        command = self.command()
        line = " ".join(shlex.quote(part) for part in command)
        if command[1:3] == ["-m", "pipeline"]:  # not installed as a command: import it from the project folder
            line = f"PYTHONPATH={shlex.quote(str(Path(__file__).resolve().parents[1]))} {line}"
        if self.environment:
            settings = (f"{name}={shlex.quote(value)}" for name, value in sorted(self.environment.items()))
            line = " ".join([*settings, line])
        # the configuration's relative paths (models, queries_file) mean what they meant here:
        # cron starts in the home folder, systemd in /
        line = f"cd {shlex.quote(self.folder)} && {line}"
        if not self.submit_address:
            # one summary a run, named by the time (UTC) the shell sees when it starts: a second
            # run of the same day (started by hand, or a missed night caught up) wrote over the first
            line += f" --summary-json {shlex.quote(str(self.logs()))}/summary-$(date -u +%FT%H%M%SZ).json"
        line += f" >> {shlex.quote(str(self.logs() / 'vidlens.log'))} 2>&1"
        return line.replace("%", "\\%") if cron else line  # cron turns a bare % into a newline

    def cron_entry(self) -> str:
        """One crontab line, tagged with the schedule's name so installing twice changes nothing."""
        hour, minute = self.hour_minute()
        for what, value in (("the source", self.source), ("--out", self.out), ("--config", self.config),
                            ("--submit", self.submit_address), ("--log-dir", self.log_dir),
                            ("the folder it runs in", self.folder), *self.environment.items()):
            if value and ("\n" in value or "\r" in value):  # (quoted, it still ends the crontab's line)
                # (a path may be renamed; an address or a variable's value holding one is no use anywhere)
                named = what not in ("--submit", *self.environment)
                raise ValueError(f"{what} {value!r} holds a line break, where cron would end the job's line: " + (
                    "rename it, or schedule with --systemd" if named else "give it without one"))
        logs = shlex.quote(str(self.logs())).replace("%", "\\%")
        return f"{minute} {hour} * * * mkdir -p {logs} && {self.shell_line(cron=True)}" \
               f"  # {self.name}"

    def systemd_units(self) -> dict[str, str]:
        """File name -> text of a user service and its timer."""
        hour, minute = self.hour_minute()
        what = "submit to " + self.submit_address if self.submit_address else "incremental run"
        service = (
            "[Unit]\n"
            # systemd reads % as a specifier (%% is a literal one), and splits at spaces out of quotes
            # (a newline or carriage return in a path would end the line: the rest would be read as
            # settings of the unit)
            "Description=" + re.sub(r"[\r\n]", " ", f"vidlens {what}: {self.source} -> {self.out}").replace("%", "%%")
            + "\n\n"
            + "[Service]\n"
            "Type=oneshot\n"
            f"ExecStartPre=/bin/mkdir -p {_systemd_word(str(self.logs()))}\n"
            f"ExecStart=/bin/sh -c {_systemd_word(self.shell_line())}\n"
            "# exit 3 = some videos failed (they are retried next time); 2 = the run failed or was locked\n"
        )
        timer = (
            "[Unit]\n"
            f"Description=Nightly {self.name}\n\n"
            "[Timer]\n"
            f"OnCalendar=*-*-* {hour:02d}:{minute:02d}:00\n"
            "Persistent=true\n\n"
            "[Install]\n"
            "WantedBy=timers.target\n"
        )
        return {f"{self.name}.service": service, f"{self.name}.timer": timer}


def _systemd_word(text: str) -> str:
    r"""`text` as one word of a systemd `Exec*` line, passed on unchanged.

    systemd reads its own quoting there, not the shell's: it undoes C escapes (`\\` becomes `\`) and
    replaces `$NAME`, `${NAME}` and `%` specifiers even inside quotes, so a path holding a
    backslash or a `$` reached the shell changed. Here the word is double-quoted with `\` and `"`
    escaped, `$$` for a `$` and `%%` for a `%` (as NixOS' `escapeSystemdExecArg`).
    """
    # (systemd ends a unit's line at a carriage return too, not only at a newline)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("$", "$$").replace("%", "%%") + '"'


def vidlens_executable() -> list[str]:
    """This installation's `vidlens` command by absolute path (or this Python with -m pipeline)."""
    beside = Path(sys.executable).parent / "vidlens"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("vidlens")
    if found:
        return [str(Path(found).absolute())]
    return [sys.executable, "-m", "pipeline"]


def install_cron(schedule: Schedule) -> str:
    """Add (or replace) the schedule's line in the user's crontab; returns what was done."""
    listed = _tool(["crontab", "-l"], "install cron, or use --systemd, or give the line above to your scheduler")
    lines = listed.stdout.splitlines() if listed.returncode == 0 else []
    kept = [line for line in lines if not line.rstrip().endswith(f"# {schedule.name}")]
    kept.append(schedule.cron_entry())
    written = _tool(["crontab", "-"], "", "\n".join(kept) + "\n")
    if written.returncode:
        raise RuntimeError(f"crontab refused the entry ({_said(written)}): the line above was not installed")
    return f"installed {schedule.name} in the crontab ({'replaced' if len(kept) == len(lines) else 'added'})"


def install_systemd(schedule: Schedule) -> str:
    """Write the user units under ~/.config/systemd/user and enable the timer."""
    folder = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd" / "user"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in schedule.systemd_units().items():
        (folder / name).write_text(text)
    timer = f"{schedule.name}.timer"
    for step in (["daemon-reload"], ["enable", "--now", timer]):
        done = _tool(["systemctl", "--user", *step], f"the units are written in {folder}; use cron (without --systemd)")
        if done.returncode:
            raise RuntimeError(
                f"systemctl --user {' '.join(step)} failed ({_said(done)}): the units are written in {folder}, "
                f"but the timer is not enabled; run `systemctl --user enable --now {timer}` in a login "
                "session (over SSH: `loginctl enable-linger` first), or use cron (without --systemd)")
    return f"installed {folder / schedule.name}.service and .timer (systemctl --user list-timers to check)"


def _tool(command: list[str], instead: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """A scheduler's command, run; RuntimeError naming it and what to do `instead` where it is missing."""
    try:
        return subprocess.run(command, input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"there is no `{command[0]}` command on this machine: {instead}") from None


def _said(done: subprocess.CompletedProcess) -> str:
    text = (done.stderr or done.stdout or "").strip().splitlines()
    return text[-1] if text else f"exit code {done.returncode}"
