"""The run configuration: one frozen, typed object, loaded from YAML or TOML and overridden from the CLI.

Every section is a frozen dataclass (`schemas.config_sections`). `RunConfig.from_dict` checks
every key and type and names the offending key in its error (`schemas.config_reading`);
`RunConfig.fingerprint()` hashes everything that can change a result (not the resource knobs),
and is stored on every output row. The sections are imported from here, with `RunConfig`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config_reading import SENTENCE_LISTS, build, read_config_file
from schemas.config_sections import (
    ALL_STAGES, BOUNDS, DEFAULT_CAPTION_MODEL, DEFAULT_EMBED_MODEL, DTYPES, OCR_FRAMES, QUANTIZE_MODES, SAMPLING_MODES,
    CaptionsConfig, ConfigError, IncrementalConfig, LabelsConfig, MatchConfig, ModelsConfig, OcrConfig, OutputConfig,
    ResourcesConfig, SamplingConfig, ShotsConfig, StorageConfig,
)
from schemas.secrets import REDACTED, SECRET_STORAGE_KEYS, redact_options, redacted_url

#: what `from schemas.config import ...` gives besides `RunConfig`: its sections and their vocabularies.
__all__ = [
    "ADDED_SETTINGS", "ALL_STAGES", "DEFAULT_CAPTION_MODEL", "DEFAULT_EMBED_MODEL", "DTYPES", "NOT_RESULTS", "OCR_FRAMES",
    "QUANTIZE_MODES", "SAMPLING_MODES", "SUBMITTED_CONFIG_ENV", "CaptionsConfig", "ConfigError", "IncrementalConfig",
    "LabelsConfig", "MatchConfig", "ModelsConfig", "OcrConfig", "OutputConfig", "ResourcesConfig", "RunConfig",
    "SamplingConfig", "ShotsConfig", "StorageConfig", "model_location", "setting_from_text",
]

#: settings that can change a result and came after outputs existed ("section.key": the default
#: they came with). Left at that default, one is not part of the fingerprints, so that the
#: version that adds it reruns nobody's videos (docs/incremental.md). A setting added without
#: an entry here changes every fingerprint, which a test of the default ones catches.
ADDED_SETTINGS: dict[str, Any] = {"ocr.frames": "keyframes", "sampling.max_frame_pixels": 16384 * 8192,
                                   "shots.max_frames": 324_000}

#: settings that change no result: where models are cached and encoded labels kept, how many shot
#: windows a forward pass takes, how rows are batched into files and published, and the bounds on
#: what a video may cost to decode (its largest frame, its frames, its sampled pixels: a video
#: one refuses has no rows, and is tried again once it is raised). No fingerprint tells
#: configurations apart by them, so that changing one reruns no video and `vidlens submit` gives
#: the batch the same job id.
NOT_RESULTS = ("models.cache_dir", "models.text_cache", "shots.batch_windows",
               "output.rows_per_file", "output.commit_every_videos", "output.commit_every_s",
               "sampling.max_frame_pixels", "sampling.max_video_frames", "sampling.max_pixels_per_video")
#: the value a `NOT_RESULTS` setting is hashed at where its default has changed since fingerprints
#: were first made with it: `shots.batch_windows` was 8 until 2026-12-07 (now 0, by device).
NOT_RESULTS_HASHED_AS = {"shots.batch_windows": 8}

#: the environment variable that carries a job's configuration (JSON, without secrets) to the job
#: `vidlens submit` sends (`vidlens run --config-env`).
SUBMITTED_CONFIG_ENV = "VIDLENS_CONFIG_JSON"


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of a run."""

    stages: tuple[str, ...] = ALL_STAGES
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    shots: ShotsConfig = field(default_factory=ShotsConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in ALL_STAGES]
        if unknown:
            raise ConfigError(
                f"stages: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(ALL_STAGES)}"
            )
        # keep the canonical order whatever order the user wrote
        object.__setattr__(self, "stages", tuple(s for s in ALL_STAGES if s in self.stages))
        if not self.stages:
            raise ConfigError(f"stages: none given; choose one or more of {', '.join(ALL_STAGES)}")
        for setting, templates in (("match.template", (self.match.template,)),
                                   ("labels.object_templates", self.labels.object_templates),
                                   ("labels.scene_templates", self.labels.scene_templates)):
            for template in templates:
                if "{}" not in template:  # (every query or name made the same prompt: equal scores)
                    raise ConfigError(f"{setting}: {template!r} has no {{}} where the text goes, so every text "
                                      "would be the same prompt: write it like \"a video of {}\"")
        for role in ("embed", "captions"):  # (one empty was "a folder that exists but holds no loadable model")
            if self.runs(role) and not getattr(self.models, role).strip():
                raise ConfigError(f"models.{role}: empty: give a Hugging Face model id or a local folder")
        for stage in ("objects", "scenes"):  # (no templates is each name as it is)
            if self.enabled(stage) and not getattr(self.labels, stage):
                raise ConfigError(f"labels.{stage}: none given, and the {stage} stage runs: give one or more names, "
                                  f"or leave {stage} out of stages")
        if any(not query.strip() for query in self.match.queries):
            raise ConfigError("match.queries: an empty query (--query \"\"?): each query is text to score videos against")
        self._set_texts_once()
        if self.sampling.mode not in SAMPLING_MODES:
            raise ConfigError(
                f"sampling.mode: {self.sampling.mode!r} is not one of {', '.join(SAMPLING_MODES)}"
            )
        if self.ocr.frames not in OCR_FRAMES:
            raise ConfigError(f"ocr.frames: {self.ocr.frames!r} is not one of {', '.join(OCR_FRAMES)}")
        if self.models.dtype not in DTYPES:  # (said by the model stages only: after a submit or a schedule)
            raise ConfigError(f"models.dtype: {self.models.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.models.quantize not in QUANTIZE_MODES:
            raise ConfigError(
                f"models.quantize: {self.models.quantize!r} is not one of {', '.join(QUANTIZE_MODES)}"
            )
        if self.resources.executor not in ("ray", "local"):
            raise ConfigError(f"resources.executor: {self.resources.executor!r} is not 'ray' or 'local'")
        if self.resources.decoder not in ("decord", "pyav"):
            raise ConfigError(f"resources.decoder: {self.resources.decoder!r} is not 'decord' or 'pyav'")
        for name, (low, high, low_excluded) in BOUNDS.items():
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            if value is None:
                continue
            if low_excluded and value <= low:
                raise ConfigError(f"{name}: must be more than {low}, got {value}")
            if value < low or (high is not None and value > high):
                wanted = f"at least {low}" if high is None else f"between {low} and {high}"
                raise ConfigError(f"{name}: must be {wanted}, got {value}")
        if self.resources.min_actors > self.resources.max_actors:
            raise ConfigError(f"resources.min_actors ({self.resources.min_actors}) is more than "
                              f"resources.max_actors ({self.resources.max_actors})")

    def enabled(self, stage: str) -> bool:
        """Whether a stage runs in this configuration."""
        return stage in self.stages

    def runs(self, stage: str, among: frozenset[str] | None = None) -> bool:
        """Whether the pipeline stage `stage` runs (and is `among` those, if given): the embed
        stage also for objects, scenes and match, which it derives from its embeddings."""
        derived = ("embed", "objects", "scenes", "match") if stage == "embed" else (stage,)
        return any(self.enabled(s) for s in derived) and (among is None or stage in among)

    def _set_texts_once(self) -> None:
        """Each label name, template and query once, stripped (the tokenizer reads " car " as "car"):
        a name twice took part of the softmax's probability twice, lowering every other label's
        score and pushing one out of the top k, and its rows came twice; a blank name is refused."""
        labels = {}
        for setting in ("objects", "scenes", "object_templates", "scene_templates"):
            texts = [text.strip() for text in getattr(self.labels, setting)]
            if not all(texts):
                raise ConfigError(f"labels.{setting}: an empty entry: each is a name (or template) to score frames "
                                  "against")
            labels[setting] = tuple(dict.fromkeys(texts))
        object.__setattr__(self, "labels", dataclasses.replace(self.labels, **labels))
        queries = tuple(dict.fromkeys(query.strip() for query in self.match.queries))
        object.__setattr__(self, "match", dataclasses.replace(self.match, queries=queries))

    def all_queries(self) -> tuple[str, ...]:
        """Queries from the config and from `match.queries_file`, without duplicates, in order."""
        queries = list(self.match.queries)
        if self.match.queries_file:
            path = Path(self.match.queries_file)
            if not path.is_file():
                # (as a model folder's: the file at ~/q.txt was said not to exist)
                full = path.expanduser()
                tilde = f" (~ is not expanded here: write {full})" if full.is_file() and full != path else ""
                raise ConfigError(f"match.queries_file: {path} {'is a folder' if path.is_dir() else 'does not exist'}"
                                  f"{tilde}: give a text file of one query a line")
            try:
                text = path.read_text(encoding="utf-8-sig")  # as Notepad saves it, with a BOM
            except UnicodeDecodeError as exc:
                raise ConfigError(f"match.queries_file: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") \
                    from None
            lines = (line.strip() for line in text.splitlines())
            queries += [line for line in lines if line and not line.startswith("#")]  # comments
        return tuple(dict.fromkeys(queries))

    # --- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the inverse of `from_dict`."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        """Canonical JSON, as stored in the runs table, with storage secrets shown as `***`."""
        return json.dumps(self.redacted_dict(), sort_keys=True, separators=(",", ":"))

    def redacted_dict(self) -> dict[str, Any]:
        """`to_dict()` with every storage secret (and secret-looking option) replaced by `***`."""
        body = self.to_dict()
        storage = body["storage"]
        for name in SECRET_STORAGE_KEYS:
            if storage[name] is not None:
                storage[name] = REDACTED
        storage["endpoint_url"] = redacted_url(storage["endpoint_url"])
        storage["options"] = redact_options(storage["options"])
        return body

    def fingerprint(self) -> str:
        """Hash of everything that can change a result (resources, storage, incremental and
        `NOT_RESULTS` excluded), with the queries file's lines, not its path."""
        body = self._fingerprinted()
        body.pop("resources")
        body.pop("storage")
        body.pop("incremental")
        body["models"].pop("text_cache")  # (never hashed: the fingerprints made since it came stay)
        if self.match.queries_file:
            try:
                body["match"]["queries"] = list(self.all_queries())
                body["match"]["queries_file"] = None
            except ConfigError:
                pass  # a file not here (one on a cluster's nodes) is known by its path alone
        return _hash(body)

    def stage_fingerprint(self, stage: str, queries_path: bool = False, models_as_written: bool = False) -> str:
        """Hash of the settings a single stage's results depend on. The queries file is left out
        (the matches unit hashes its lines), unless `queries_path`; a local model folder is hashed
        by its absolute path (`model_location`), unless `models_as_written`: as fingerprints were
        made before 2026-12-04 (the path) and 2026-12-05 (the model), which outputs still carry."""
        body = self._fingerprinted(models_as_written)
        if not queries_path:
            body["match"]["queries_file"] = None  # (a key, not removed: other fingerprints stay as they were)
        parts = {"sampling": body["sampling"], "shots": body["shots"] if self.enabled("shots") else None}
        parts.update({name: body[name] for name in _STAGE_SECTIONS.get(stage, ())})
        parts["models"] = {k: body["models"][k] for k in _STAGE_MODELS.get(stage, ())}
        return _hash({"stage": stage, **parts})

    def _fingerprinted(self, models_as_written: bool = False) -> dict[str, Any]:
        """`to_dict()` less the `ADDED_SETTINGS` left at the default they were added with, its
        model folders by their absolute paths unless `models_as_written` (./m, /abs/m and /abs/m/
        are one model: `vidlens submit` makes them absolute, and `run` after it reran every video),
        and the `NOT_RESULTS` at their defaults."""
        body = self.to_dict()
        for name in NOT_RESULTS:
            section, key = name.split(".")
            # hashed at its default, not removed: a configuration that leaves them be keeps the
            # fingerprints its rows and its `vidlens submit` job id had
            body[section][key] = NOT_RESULTS_HASHED_AS.get(name, getattr(type(getattr(self, section))(), key))
        if not models_as_written:
            for role in ("embed", "captions"):
                body["models"][role] = model_location(body["models"][role])
        for name, default in ADDED_SETTINGS.items():
            section, key = name.split(".")
            if body[section].get(key) == default:
                del body[section][key]
        return body

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "RunConfig":
        """Build from nested plain values (a parsed YAML file), checking every key and type."""
        return build(cls, raw or {}, "")

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """Load a configuration file: TOML where its name ends in .toml, else YAML; an unknown
        key or wrong type is an error naming the file and key."""
        path = Path(path)
        raw = read_config_file(path)
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    #: its name before it read TOML too, kept for the scripts (and tests) that call it
    from_yaml = from_file

    def with_overrides(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with dotted keys replaced, e.g. {"sampling.num_frames": 16}."""
        body = self.to_dict()
        for dotted, value in overrides.items():
            node = body
            *parents, leaf = dotted.split(".")
            # within a mapping setting the keys are the user's (resources.per_stage.captions.num_gpus)
            within = any(dotted.startswith(f"{name}.") for name in _MAPPING_SETTINGS)
            for part in parents:
                if within and part not in node:
                    node[part] = {}
                if not isinstance(node.get(part), dict):
                    sections = ", ".join(sorted(key for key, value in node.items() if isinstance(value, dict)))
                    raise ConfigError(f"{dotted}: {part!r} is not a configuration section (sections: {sections})")
                node = node[part]
            if leaf not in node and not within:
                # (as the same typo in a YAML file is told)
                raise ConfigError(f"{dotted}: unknown setting (known: {', '.join(sorted(node))})")
            node[leaf] = value
        return RunConfig.from_dict(body)


#: settings that are mappings of the user's keys: `with_overrides` sets a key within them.
_MAPPING_SETTINGS = ("resources.per_stage", "storage.options")

_STAGE_SECTIONS = {
    "shots": ("shots",),
    "embed": (),
    "objects": ("labels",),
    "scenes": ("labels",),
    "captions": ("captions",),
    "match": ("match",),
    "ocr": ("ocr",),
}
_STAGE_MODELS = {
    "embed": ("embed", "embed_revision"),
    "objects": ("embed", "embed_revision"),
    "scenes": ("embed", "embed_revision"),
    "match": ("embed", "embed_revision"),
    "captions": ("captions", "captions_revision"),
}


def model_location(model: str) -> str:
    """A model as outputs know it: a local folder by its absolute path, however it was written
    (./m, /abs/m/), a hub id as given."""
    return os.path.abspath(model) if Path(model).is_dir() else model


def _hash(body: Any) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def setting_from_text(dotted: str, text: str) -> Any:
    """The value of the setting `dotted` given as `text` on a command line (`--set KEY=VALUE`):
    YAML ("16", "[a, b]", "{decode: {num_cpus: 1}}", "true"), but a text setting's text as written
    ("match.template=a video of: {}" is no mapping, "#{}" no comment) unless quoted, null as none
    and true/false as in a config file (refused for text, "off" for models.text_cache), and a list
    of texts' text as written unless it is a YAML list ("match.queries=a dog: running", "#1 trending"),
    null or nothing as none."""
    import yaml

    cls: Any = RunConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            cls = None  # not a setting: `with_overrides` says so
            break
        cls = typing.get_type_hints(cls)[part]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        if typing.get_origin(cls) is tuple and dotted not in SENTENCE_LISTS and text.strip().startswith("["):
            # ("[dog, cat" was split at commas into the labels "[dog" and "cat", silently)
            raise ConfigError(f"--set {dotted}: {text.strip()!r} is no YAML list: close its bracket, as in "
                              f"--set {dotted}=[a, b], or give the names split at commas, as in --set {dotted}=a,b")
        return text
    if cls is str or cls == (str | None):
        bare = text.strip()
        if bare in ("null", "~", ""):
            return text if cls is str and not bare else None
        quoted = bare[:1] in ("'", '"') and isinstance(value, str)
        return value if quoted or isinstance(value, bool) else text
    if typing.get_origin(cls) is tuple:
        if text.strip() in ("null", "~", ""):
            return []
        if not isinstance(value, (list, str)):
            return text  # (a list of names split at commas, a sentence one item)
    return value
