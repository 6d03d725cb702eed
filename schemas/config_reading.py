"""Settings as written, read into the typed configuration: a YAML or TOML file (`read_config_file`),
and plain values checked and coerced into a section's dataclass (`build`), every error naming the
setting; a credential's value is never echoed."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any

from schemas.config_sections import ConfigError
from schemas.secrets import REDACTED, SECRET_SETTINGS

#: lists of sentences, where a comma is part of the text: one given as a single text is one item
#: (the other lists, of names such as stages and labels, are split at commas)
SENTENCE_LISTS = frozenset({"match.queries", "labels.object_templates", "labels.scene_templates"})


def read_config_file(path: Path) -> dict[str, Any]:
    """A configuration file's sections as plain values: TOML where its name ends in .toml, else
    YAML; ConfigError naming the file where it cannot be read or parsed."""
    text = _config_text(path)
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # (Python 3.10: its backport, the same parser)
            import tomli as tomllib
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    else:
        import yaml

        try:
            raw = yaml.load(text, Loader=unique_keys_loader()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from exc
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections at its top level")
    return raw


def _config_text(path: Path) -> str:
    """A configuration file's text; ConfigError where it is not there, a folder or not UTF-8."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: give the YAML or TOML file in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")  # (a byte order mark is UTF-8's too)
    except UnicodeDecodeError as exc:  # (Notepad's "Unicode" is UTF-16)
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start} is not UTF-8): "
                          "save it as UTF-8") from None


def _yaml_problem(exc: Any) -> str:
    """PyYAML's error in one line: what is wrong and where (its own text spans four, with a caret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


@functools.cache
def unique_keys_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping: it kept the last, and a
    section written twice lost the first one's settings without a word."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen: set = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # (<<: *base, whose keys the mapping's own override)
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    again = key in seen
                    seen.add(key)
                except TypeError:  # (an unhashable key, which the loader refuses itself)
                    continue
                if again:
                    raise ConfigError(f"{key} is given twice (line {key_node.start_mark.line + 1}): "
                                      "write each setting once")
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def build(cls: type, raw: Any, prefix: str) -> Any:
    """An instance of the configuration dataclass `cls` from plain values, each checked and coerced to
    its declared type; `prefix` ("sampling.") names a setting in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=str)  # (YAML reads a key on: or 1: as true or a number)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown setting (known: {', '.join(sorted(known))})"
        )
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    # a credential's value is never echoed in an error: none is registered for redaction yet
    shown = REDACTED if key in SECRET_SETTINGS else repr(value)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is tuple:
        if isinstance(value, str):
            value = [value] if key in SENTENCE_LISTS else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {shown}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got a {type(value).__name__}")
        return dict(value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if type(value) is int and value in (0, 1):  # as the texts "0" and "1" are
            return bool(value)
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {shown}")
        return value
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {shown}")
        if hint is int and isinstance(value, str):
            try:
                value = float(value)  # YAML reads 8e9 (no dot) as text
            except ValueError:
                pass
        try:
            number = hint(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {shown}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {shown}")
        if hint is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{key}: expected a whole number, got {shown}")
        return number
    if hint is str:
        if isinstance(value, bool) and key == "models.text_cache" and not value:
            return "off"  # YAML reads an unquoted off as false
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected text, got {shown} (YAML reads an unquoted yes/no/on/off as "
                              "true or false: quote it)")
        if isinstance(value, (int, float)):  # str() would give 1.10 as 1.1, 0123 as 83
            raise ConfigError(f"{key}: expected text, got the number {shown} (YAML reads unquoted digits as a "
                              "number, 1.10 as 1.1 and 0123 as 83: quote it)")
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected text, got {shown}")
        return value
    return value
