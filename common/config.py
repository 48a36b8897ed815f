"""Typed run configuration: dataclass defaults <- optional YAML file <- command-line flags.

Every entry point describes its settings as a dataclass. ``parse_config`` builds an argparse parser from
the dataclass fields (flag names are the field names, e.g. ``--batch_size``), merges an optional
``--config file.yaml`` on top of the defaults and then the flags given explicitly on the command line.
Unknown keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.io import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type."""


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to the field type ``tp``; raise ConfigError naming ``key``."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}': null is not allowed (expected {getattr(base, '__name__', base)})")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        args = typing.get_args(base)
        elem = args[0] if args else Any
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        items = [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__}")
        return dict(value)
    if base is Any:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def merge_mapping(cfg: T, mapping: dict[str, Any], source: str = "config") -> T:
    """Return a copy of dataclass ``cfg`` with ``mapping`` applied; unknown keys raise ConfigError."""
    types_ = _field_types(type(cfg))
    updates = {}
    for key, value in mapping.items():
        if key not in types_:
            close = difflib.get_close_matches(str(key), list(types_), n=1)
            if close:
                raise ConfigError(f"{source}: unknown key '{key}' (did you mean '{close[0]}'?)")
            raise ConfigError(f"{source}: unknown key '{key}' (known keys: {', '.join(sorted(types_))})")
        updates[key] = _coerce(key, value, types_[key])
    return dataclasses.replace(cfg, **updates)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _flag_kwargs(name: str, tp: Any, help_text: str) -> dict[str, Any]:
    base, _ = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if base is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin in (list, tuple):
        kw["nargs"] = "+"
    return kw


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--field`` flag per dataclass field (values are validated later)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with settings (flags override it)")
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {getattr(defaults, f.name)!r})".replace("%", "%%")
        parser.add_argument(f"--{f.name}", **_flag_kwargs(f.name, tp, help_text))
    return parser


def parse_config(cls: type[T], argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None,
                 base: T | None = None) -> T:
    """Defaults (or ``base``) <- ``--config`` YAML <- explicit flags. Raises ConfigError / SystemExit."""
    parser = parser or build_parser(cls)
    ns = parser.parse_args(argv)
    cfg = base if base is not None else cls()
    if getattr(ns, "config", None):
        cfg = merge_mapping(cfg, load_yaml(ns.config), source=f"config file {ns.config}")
    known = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in vars(ns).items() if k in known}
    return merge_mapping(cfg, flags, source="command line")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) so a run can be reproduced with ``--config``."""
    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def load_config(cls: type[T], path: str | Path) -> T:
    return merge_mapping(cls(), load_yaml(path), source=f"config file {path}")
