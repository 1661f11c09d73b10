"""The one config loader: YAML files, `--set key=value` overrides, and dataclasses filled field by field.

Recipes (uvd/recipe.py), training configs (model/config.py), tokenizer training recipes
(tokenizer/train.py) and target mixes (uvd/audit.py) all load through here, so every mistake
is a ValueError that names the file and the field. The shipped configs under `recipes/` are
found with `recipes_dir()`, in a checkout and in an installed wheel alike.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

T = TypeVar("T")


def recipes_dir() -> Path:
    """The shipped configs: `uvd/recipes/` of an installed wheel (package data), else a checkout's `recipes/`."""
    installed = importlib.resources.files("uvd") / "recipes"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parents[1] / "recipes"


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or, when it does not exist, the shipped one it names
    (`recipes/laion.yaml`, `laion.yaml`, `train/tiny.yaml`): how the shipped recipes work from any folder."""
    path = Path(path)
    if path.exists():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("recipes",) else path.parts
    shipped = recipes_dir().joinpath(*parts) if parts and not path.is_absolute() else None
    return shipped if shipped is not None and shipped.is_file() else path


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """Parse a YAML file; a missing file or bad YAML is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {_yaml_problem(err)}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text (YAML) file: {err}") from err


def load_yaml_config(path: str | Path, overrides: list[str], build: Callable[[dict], T], what: str = "recipe") -> T:
    """Read a YAML file, apply `--set key=value` overrides (dotted keys, YAML values), and
    build it with `build`; every error names the file."""
    path = resolve_config_path(path)
    data = read_yaml(path, what)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} is a mapping of keys to values, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    try:
        return build(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def apply_override(data: dict[str, Any], override: str) -> None:
    """`key.sub=value` with a YAML value, into the nested mapping `data`."""
    if "=" not in override:
        raise ValueError(f"--set {override}: expected key=value, e.g. --set limits.max_items=100")
    key, _, text = override.partition("=")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as err:
        raise ValueError(f"--set {override}: the value is not valid YAML ({_yaml_problem(err)}); "
                         "quote it to pass a string, e.g. --set 'inputs=\"[a\"'") from err
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"--set {override}: {key!r} is not a dotted key such as tokenizer.dtype")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {override}: {part} is not a section")
    node[parts[-1]] = value


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(err).replace("\n", " ")


def from_mapping(cls: type, data: dict[str, Any], path: str) -> Any:
    """Fill dataclass `cls` from `data`, checking keys and value types (nested dataclasses too);
    `path` is where `data` sits in the file ("" for the top level)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            known = ", ".join(fields) or "(none)"
            raise ValueError(f"{where}: unknown key; expected one of {known}")
        values[key] = _coerce(value, hints[key], where)
    missing = [name for name, f in fields.items() if name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{f'{path}.' if path else ''}{missing[0]}: required")
    return cls(**values)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, path)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value if value is not None else {}, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string; take it as the number it plainly is.
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{path} key"): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    raise TypeError(f"{path}: unsupported field type {hint}")
