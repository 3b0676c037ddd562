"""Layered run configuration: defaults file -> experiment file -> ``key=value`` overrides.

    cfg = load_config("configs/tiny.yaml", ["train.steps=50", "model.decoder.depth=1"])
    save_config(cfg, run_dir / "config.yaml")

Every key must exist in ``stellar/train/defaults.yaml``; unknown keys are an error that names
them all. Override values are parsed as YAML (``train.lr=1e-3`` is a float, ``data.root=null``
is None, ``data.global_scale=[0.3,1]`` a list), keys are dotted paths.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

DEFAULTS_PATH = Path(__file__).with_name("defaults.yaml")
# configs/ sits beside the package in a source checkout (pip install -e .).
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config file or override that does not fit the defaults' schema."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"""),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """A YAML scalar/list/mapping from an override's right-hand side."""
    return yaml.load(text, Loader=_Loader) if text.strip() else None


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file (an empty file is ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.load(f, Loader=_Loader)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def resolve_config_path(name: str | os.PathLike) -> Path:
    """A path as given, or a bare name such as ``tiny`` found in the repository's configs/."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIGS_DIR / path, CONFIGS_DIR / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name} (nor in {CONFIGS_DIR})")


def merge(base: Mapping, update: Mapping, where: str = "") -> dict:
    """``base`` updated by ``update`` recursively; keys absent from ``base`` are an error.

    All unknown keys are collected and reported together, as dotted paths.
    """
    merged = copy.deepcopy(dict(base))
    unknown: list[str] = []
    _merge_into(merged, update, where, unknown)
    if unknown:
        raise ConfigError("unknown config keys: " + ", ".join(unknown))
    return merged


def _merge_into(target: dict, update: Mapping, where: str, unknown: list[str]) -> None:
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in target:
            unknown.append(path)
            continue
        if isinstance(target[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {path} is a section; got {value!r}")
            _merge_into(target[key], value, path, unknown)
        elif isinstance(value, Mapping) and target[key] is not None:
            raise ConfigError(f"config key {path} takes a value, not a mapping; got {value!r}")
        else:
            target[key] = copy.deepcopy(value)


def parse_override(text: str) -> dict:
    """``"a.b.c=1"`` -> ``{"a": {"b": {"c": 1}}}``."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override must look like key=value with a dotted key, got {text!r}")
    nested: dict = parse_value(value)
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_config(
    experiment: str | os.PathLike | Mapping | None = None,
    overrides: Iterable[str] = (),
    defaults: str | os.PathLike = DEFAULTS_PATH,
) -> dict:
    """The merged config: defaults, then the experiment (file path, name or mapping), then overrides."""
    cfg = read_yaml(defaults)
    if experiment is not None:
        layer = experiment if isinstance(experiment, Mapping) else read_yaml(resolve_config_path(experiment))
        cfg = merge(cfg, layer)
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    return cfg


def save_config(cfg: Mapping, path: str | os.PathLike) -> Path:
    """Write ``cfg`` as YAML atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        yaml.safe_dump(_plain(cfg), f, sort_keys=False, default_flow_style=None)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _plain(value: Any) -> Any:
    """Tuples -> lists and so on, so safe_dump writes plain YAML."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
