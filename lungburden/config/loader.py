"""Load, override and validate the YAML configuration (:class:`~lungburden.config.schema.Config`).

- Every key is optional; missing keys take the dataclass defaults.
- Unknown keys, wrong types and out-of-range values are errors naming the key and the value
  (all problems are reported at once by :class:`ConfigError`).
- Environment variables ``LUNGBURDEN_<SECTION>__<KEY>`` override the file, e.g.
  ``LUNGBURDEN_NODE__PORT=11113``; destinations are addressed by name,
  ``LUNGBURDEN_DESTINATIONS__<NAME>__<KEY>`` (a new name creates a destination; ``-`` in a
  name is written ``_``, e.g. ``LUNGBURDEN_DESTINATIONS__PACS_WEB__URL``). Values are
  read as YAML scalars/flow collections (``[A, B]``), except for text keys, which are taken
  verbatim. Variables without ``__`` are not configuration overrides and are ignored.
- Relative paths (``node.storage_dir``, folder destinations, ``logging.file``) are resolved
  against the directory of the configuration file.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lungburden.config.schema import DESTINATION_TYPES, Config

ENV_PREFIX = "LUNGBURDEN_"


class ConfigError(ValueError):
    """Invalid configuration; ``problems`` holds ``(key, value, message)`` tuples."""

    def __init__(self, problems: list[tuple[str, object, str]], source: str = "<config>"):
        self.problems = problems
        self.source = source
        lines = [f"{key}: {message} (got {value!r})" for key, value, message in problems]
        super().__init__(f"invalid configuration {source}:\n  " + "\n  ".join(lines))


class _EnvValue(str):
    """A raw string from an environment variable; converted according to the target type."""

    var: str = ""


_MISSING = object()


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != len(typing.get_args(tp)) and len(args) == 1:
            return True, args[0]
    return False, tp


class _Builder:
    def __init__(self) -> None:
        self.problems: list[tuple[str, object, str]] = []

    def fail(self, key: str, value: object, message: str) -> object:
        self.problems.append((key, value, message))
        return _MISSING

    def convert(self, tp: Any, value: object, key: str) -> object:
        optional, inner = _is_optional(tp)
        if isinstance(value, _EnvValue):
            key = f"{key} (from {value.var})"
            if optional and value.strip().lower() in ("", "null", "~", "none"):
                return None
            if inner in (str, Path):
                value = str(value)  # text is taken verbatim
            else:
                try:
                    value = yaml.safe_load(str(value))
                except yaml.YAMLError as exc:
                    return self.fail(key, str(value), f"is not a valid YAML value ({exc.__class__.__name__})")
        if value is None:
            if optional:
                return None
            return self.fail(key, value, "must not be null")
        tp = inner
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, key)
        if tp is bool:
            if isinstance(value, bool):
                return value
            return self.fail(key, value, "must be true or false")
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return self.fail(key, value, "must be an integer")
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            return self.fail(key, value, "must be a number")
        if tp is str:
            if isinstance(value, str):
                return str(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return self.fail(key, value, "must be text (quote it in YAML)")
            return self.fail(key, value, "must be text")
        if tp is Path:
            if isinstance(value, str) and value:
                return Path(str(value))
            return self.fail(key, value, "must be a path")
        if origin is Literal:
            allowed = typing.get_args(tp)
            if value in allowed:
                return value
            return self.fail(key, value, f"must be one of {', '.join(map(str, allowed))}")
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if not isinstance(value, (list, tuple)):
                if isinstance(value, str) and item_tp is str:
                    return self.fail(key, value, "must be a list (e.g. [A, B])")
                return self.fail(key, value, "must be a list")
            items = [self.convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
            return _MISSING if any(v is _MISSING for v in items) else items
        if origin is tuple:
            args = typing.get_args(tp)
            if not isinstance(value, (list, tuple)) or len(value) != len(args):
                return self.fail(key, value, f"must be a list of {len(args)} values")
            items = [self.convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))]
            return _MISSING if any(v is _MISSING for v in items) else tuple(items)
        if origin is dict:
            if not isinstance(value, Mapping):
                return self.fail(key, value, "must be a mapping")
            out = {}
            for k, v in value.items():
                converted = self.convert(str, v, f"{key}.{k}")
                if converted is not _MISSING:
                    out[str(k)] = converted
            return out
        raise TypeError(f"unsupported configuration type {tp!r} at {key}")  # a schema bug

    def build(self, cls: type, value: object, key: str) -> object:
        if not isinstance(value, Mapping):
            return self.fail(key, value, "must be a mapping")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "source"}
        kwargs: dict[str, object] = {}
        for raw_key, raw_value in value.items():
            name = str(raw_key)
            sub = f"{key}.{name}" if key else name
            if name not in fields:
                close = difflib.get_close_matches(name, list(fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
                self.fail(sub, raw_value, f"unknown key{hint}")
                continue
            converted = self.convert(hints[name], raw_value, sub)
            if converted is not _MISSING:
                kwargs[name] = converted
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in kwargs and name not in value:
                self.fail(f"{key}.{name}" if key else name, None, "is required")
        if any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and n not in kwargs for n, f in fields.items()):
            return _MISSING
        return cls(**kwargs)

    def destinations(self, value: object) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail("destinations", value, "must be a list of destinations")
            return []
        out = []
        for i, item in enumerate(value):
            key = f"destinations[{i}]"
            if not isinstance(item, Mapping):
                self.fail(key, item, "must be a mapping with at least name and type")
                continue
            kind = item.get("type")
            if kind not in DESTINATION_TYPES:
                self.fail(f"{key}.type", kind, f"must be one of {', '.join(DESTINATION_TYPES)}")
                continue
            built = self.build(DESTINATION_TYPES[str(kind)], item, key)
            if built is not _MISSING:
                out.append(built)
        return out


def apply_env_overrides(raw: dict, environ: Mapping[str, str]) -> dict:
    """Return a copy of the raw YAML mapping with ``LUNGBURDEN_<SECTION>__<KEY>`` applied."""
    raw = {k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, list) else v) for k, v in raw.items()}
    if isinstance(raw.get("destinations"), list):
        raw["destinations"] = [dict(d) if isinstance(d, Mapping) else d for d in raw["destinations"]]
    problems: list[tuple[str, object, str]] = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        value = _EnvValue(environ[var])
        value.var = var
        parts = var[len(ENV_PREFIX):].lower().split("__")
        section = parts[0]
        if section not in Config.SECTIONS or any(not p for p in parts):
            close = difflib.get_close_matches(section, Config.SECTIONS, n=1)
            hint = f"; did you mean LUNGBURDEN_{close[0].upper()}__...?" if close else ""
            problems.append((var, environ[var], f"unknown configuration section {section!r}{hint}"))
            continue
        if section == "destinations":
            if len(parts) != 3:
                problems.append((var, environ[var], "use LUNGBURDEN_DESTINATIONS__<NAME>__<KEY>"))
                continue
            dests = raw.setdefault("destinations", []) or []
            raw["destinations"] = dests
            # names are matched case-insensitively, "-" written as "_" (shells reject "-" in names)
            match = [d for d in dests if isinstance(d, dict)
                     and str(d.get("name", "")).lower().replace("-", "_") == parts[1].replace("-", "_")]
            if match:
                target = match[0]
            else:
                target = {"name": parts[1]}
                dests.append(target)
            target[parts[2]] = value if parts[2] != "type" else str(value).strip().lower()
            continue
        if len(parts) != 2:
            problems.append((var, environ[var], f"use LUNGBURDEN_{section.upper()}__<KEY>"))
            continue
        block = raw.get(section)
        if block is None:
            block = raw[section] = {}
        if not isinstance(block, dict):
            continue  # reported when the section is built
        block[parts[1]] = value
    if problems:
        raise ConfigError(problems, "environment")
    return raw


def config_from_mapping(raw: Mapping | None, source: str = "<mapping>", base_dir: Path | None = None) -> Config:
    """Build and validate a :class:`Config` from a parsed YAML mapping (overrides already applied)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError([("<top level>", raw, "must be a mapping of sections")], source)
    builder = _Builder()
    kwargs: dict[str, object] = {}
    hints = typing.get_type_hints(Config)
    for name, value in raw.items():
        name = str(name)
        if name not in Config.SECTIONS:
            close = difflib.get_close_matches(name, Config.SECTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known sections: {', '.join(Config.SECTIONS)}"
            builder.fail(name, value, f"unknown section{hint}")
            continue
        if name == "destinations":
            kwargs[name] = builder.destinations(value)
            continue
        built = builder.convert(hints[name], value if value is not None else {}, name)
        if built is not _MISSING:
            kwargs[name] = built
    if builder.problems:
        raise ConfigError(builder.problems, source)
    config = Config(**kwargs, source=source)
    if base_dir is not None:
        _resolve_paths(config, base_dir)
    problems = config.check()
    if problems:
        raise ConfigError(problems, source)
    return config


def _resolve_paths(config: Config, base: Path) -> None:
    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base / p)

    config.node.storage_dir = resolve(config.node.storage_dir)
    if config.processing.weights is not None:
        config.processing.weights = resolve(config.processing.weights)
    if config.logging.file is not None:
        config.logging.file = resolve(config.logging.file)
    for dest in config.destinations:
        if dest.type == "folder":
            dest.path = resolve(dest.path)  # type: ignore[union-attr]


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (YAML; ``None`` = embedded defaults), apply environment overrides, validate.

    Relative paths are resolved against the file's directory (the working directory when
    ``path`` is ``None``).
    """
    environ = os.environ if environ is None else environ
    if path is None:
        raw: object = {}
        source, base = "<defaults>", Path.cwd()
    else:
        path = Path(path)
        source, base = str(path), path.resolve().parent
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([("<file>", str(path), f"cannot be read ({exc.strerror})")], source) from exc
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError([("<file>", str(path), f"is not valid YAML: {exc}")], source) from exc
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError([("<top level>", raw, "must be a mapping of sections")], source)
    raw = apply_env_overrides(dict(raw), environ)  # type: ignore[arg-type]
    return config_from_mapping(raw, source, base)


def dump_config(config: Config) -> dict:
    """The configuration as a plain mapping (paths as text), e.g. for ``/health`` or debugging."""

    def plain(value: object) -> object:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "source"}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    out = plain(config)
    for dest in out["destinations"]:  # type: ignore[index]
        if dest.get("password"):
            dest["password"] = "***"
    return out  # type: ignore[return-value]
