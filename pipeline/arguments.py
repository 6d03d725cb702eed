"""What the `vidlens` command line accepts: its subcommands and flags, and the run configuration
the flags build (a config file, then flags, then --set). `pipeline.cli` runs the commands."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from pipeline.results_cli import add_commands as add_results_commands
from pipeline.results_cli import at_least_one
from pipeline.submit import add_commands as add_submit_commands
from schemas.config import ALL_STAGES, ConfigError, RunConfig, setting_from_text


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


class _Version(argparse.Action):
    """--version: vidlens' version as the runs table records it, looked up only when asked (git runs)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from pipeline.preflight import vidlens_version

        print(f"vidlens {vidlens_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(
        prog="vidlens",
        description="Batch video understanding: videos in, Parquet tables out.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log more: the info lines too, the worker processes' among them")
    parser.add_argument("--version", action=_Version, help="print vidlens' version (and commit) and exit")
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
                          "(decision, tab, URI), and the videos it would skip as given up or mark missing; nothing is "
                          "run or written")

    schedule = commands.add_parser("schedule", help="print (or install) a nightly cron entry or systemd timer")
    schedule.add_argument("source", help="what to process every night (as for run)")
    schedule.add_argument("--out", required=True, help="output folder or bucket URL (as for run)")
    schedule.add_argument("--at", default="02:00", metavar="HH:MM", help="time of day, local time (default 02:00)")
    schedule.add_argument("--submit", metavar="ADDRESS", help="submit the job to this Ray cluster instead")
    schedule.add_argument("--config", help="YAML (or .toml) configuration file for the runs")
    schedule.add_argument("--log-dir", help="local folder for the log and the nightly JSON summaries (default "
                                               "~/.local/state/vidlens/vidlens-<hash>, under $XDG_STATE_HOME "
                                               "where set)")
    schedule.add_argument("--systemd", action="store_true", help="systemd user timer instead of a cron entry")
    schedule.add_argument("--install", action="store_true", help="install it (crontab or ~/.config/systemd/user)")

    compact = commands.add_parser("compact", help="merge the small files of past runs into large ones")
    compact.add_argument("out", help="output folder or bucket URL")
    compact.add_argument("--run-date", metavar="YYYY-MM-DD",
                         help="only this run date (default: all)")
    compact.add_argument("--rows-per-file", type=at_least_one, default=500_000,
                         help="rows per compacted file (default 500000; a run writes output.rows_per_file, 50000)")
    compact.add_argument("--config", help="YAML (or .toml) configuration whose `storage:` section reaches the bucket")
    add_storage_arguments(compact)
    compact.set_defaults(query=[], set=[])  # what `config_from_args` reads of the run command's flags

    forget = commands.add_parser("forget", help="take videos out of an output: every row of theirs, and their ledger "
                                                "entries (deleted or taken-down videos)")
    forget.add_argument("out", help="output folder or bucket URL")
    forget.add_argument("uris", nargs="*", metavar="URI", help="source URIs of the videos, as in videos.uri")
    forget.add_argument("--missing", action="store_true",
                        help="every video the ledger marks missing (gone from the source at a complete listing)")
    forget.add_argument("--config", help="YAML (or .toml) configuration whose `storage:` section reaches the bucket")
    add_storage_arguments(forget)
    forget.set_defaults(query=[], set=[])

    add_results_commands(commands)
    add_submit_commands(commands)

    doctor = commands.add_parser("doctor", help="check this installation offline with tiny models")
    doctor.add_argument("--config", help="also check that the models this YAML (or .toml) configuration names "
                                             "can be loaded")
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


#: flags naming a file or folder that an empty value (an unset variable) left out without a word
_PATH_FLAGS = {"config": "--config", "queries_file": "--queries-file", "summary_json": "--summary-json",
               "log_dir": "--log-dir", "keep": "--keep"}


def check_path_arguments(args: argparse.Namespace) -> None:
    """ValueError for an empty source or output, which os and fsspec take for the current folder
    (`run VIDEOS --out ""` planned a run into it; `compact ""` said " holds no vidlens outputs"), and
    for an empty path flag: `--config "$CONFIG"` with the variable unset ran every setting's default
    (a nightly run then redid every video with the default models), `--summary-json ""` wrote none."""
    for name, flag in _PATH_FLAGS.items():
        if getattr(args, name, None) == "":
            raise ValueError(f"{flag} is an empty path (an unset variable?): give a path, or leave {flag} out")
    if getattr(args, "source", None) == "":
        raise ValueError(f"vidlens {args.command}: no source given (it is an empty path): give a folder, a video "
                         "file, a glob, a bucket URL or a manifest (.csv/.parquet)")
    if getattr(args, "out", None) == "":
        flag = args.command in ("run", "schedule", "submit")  # (the others take OUT as their first argument)
        raise ValueError(f"vidlens {args.command}: no output given ({'--out is' if flag else 'it is'} an empty path): "
                         f"give the output folder or bucket URL{'' if flag else ' a run wrote (its --out)'}")


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
    parser.add_argument("--executor", choices=("ray", "local"),
                        help="ray (default) or local (one machine, no Ray: a pool of decode processes)")
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
