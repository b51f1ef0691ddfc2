"""From a `get_config()` file and `--config.KEY=VALUE` overrides to typed config values.

Shared by every config schema (sptlm.config, sptlm.speech.config, sptlm.t2t.config,
data_pipelines.config): import the file, apply overrides type-checked against what the file
set (or against the schema for a key added after the file was written), then `convert` the
plain dict into the frozen dataclasses, naming the first unknown, missing or mistyped key.
"""

import ast
import dataclasses
import importlib.util
import pathlib
import types
import typing
from typing import Any

import ml_collections

from sptlm.errors import ConfigError


def load_config_file(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """Imports a `get_config()` file; `path:arg` passes `arg` to it."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"sptlm_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - any error in user code is a config error
    raise ConfigError(f"config file {path} failed to import: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config() function")
  return module.get_config(arg) if arg is not None else module.get_config()


def parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as reference


def optional_field(schema: Any, parents: list[str], leaf: str) -> Any:
  """The annotation of `parents.leaf` when it is a field with a default in `schema`, else None.

  A key added to the dataclasses after a config file was written (say train.schedule_steps)
  is absent from the file, yet overriding it must work.
  """
  for name in parents:
    hints = typing.get_type_hints(schema) if dataclasses.is_dataclass(schema) else {}
    if name not in hints:
      return None
    schema = hints[name]
  if not dataclasses.is_dataclass(schema):
    return None
  field = next((f for f in dataclasses.fields(schema) if f.name == leaf), None)
  if field is None or field.default is dataclasses.MISSING:
    return None
  return typing.get_type_hints(schema)[leaf]


def optional_section(schema: Any, path: list[str]) -> bool:
  """Whether `path` names a dataclass section with a default (e.g. eval) in `schema`."""
  *parents, leaf = path
  tp = optional_field(schema, parents, leaf)
  return tp is not None and dataclasses.is_dataclass(tp)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str],
                    schema: Any = None) -> None:
  """Applies `--config.a.b=value` (or `a.b=value`) overrides in place, type-checked.

  `schema` (the config dataclass) lets an override set an optional key the file leaves out.
  """
  for item in overrides:
    item = item.removeprefix("--").removeprefix("config.")
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not KEY=VALUE")
    key, text = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = cfg
    for i, name in enumerate(parents):
      if name not in node:
        if not optional_section(schema, parents[:i + 1]):
          raise ConfigError(f"unknown config key {'.'.join(parents[:i + 1])!r}")
        node[name] = ml_collections.ConfigDict()  # a section with defaults, left out of the file
      node = node[name]
    if leaf not in node:
      tp = optional_field(schema, parents, leaf)
      if tp is None:
        raise ConfigError(f"unknown config key {key!r}")
      value = parse_value(text)
      node[leaf] = text if tp is str and not isinstance(value, str) else value
      continue  # from_config_dict checks the type against the dataclass
    value = parse_value(text)
    if parents == ["mesh", "rules"]:  # None, one mesh axis, or a tuple of them
      if not (value is None or isinstance(value, (tuple, list))):
        value = text
      del node[leaf]  # ConfigDict refuses to change a field's type in place
      node[leaf] = value
      continue
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, str) and not isinstance(value, str):
      value = text
    if old is not None and type(value) is not type(old) and not (
        isinstance(old, (tuple, list)) and isinstance(value, (tuple, list))):
      raise ConfigError(f"config key {key!r} wants {type(old).__name__}, got {text!r}")
    node[leaf] = value


def convert(value: Any, tp: Any, key: str) -> Any:
  """Checks `value` against the annotation `tp` and converts it (dicts to dataclasses)."""
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, (dict, ml_collections.ConfigDict)):
      raise ConfigError(f"config key {key!r} must be a section, got {type(value).__name__}")
    value = dict(value.items())
    fields = {f.name: f for f in dataclasses.fields(tp)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
      raise ConfigError(f"unknown config key {(key + '.' if key else '') + unknown[0]!r}"
                        f" (known: {', '.join(fields)})")
    optional = {n for n, f in fields.items() if f.default is not dataclasses.MISSING}
    missing = sorted(set(fields) - set(value) - optional)  # a key added later keeps old files valid
    if missing:
      raise ConfigError(f"config key {key + '.' if key else ''}{missing[0]} is missing")
    hints = typing.get_type_hints(tp)
    return tp(**{n: convert(value[n], hints[n], f"{key}.{n}" if key else n)
                 for n in fields if n in value})
  origin = typing.get_origin(tp)
  if origin is tuple:
    if isinstance(value, (dict, ml_collections.ConfigDict)):  # rules given as a mapping
      value = list(value.items())
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"config key {key!r} must be a sequence, got {value!r}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
      if args[0] is str and isinstance(value, str):
        return (value,)
      return tuple(convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise ConfigError(f"config key {key!r} must have {len(args)} items, got {value!r}")
    return tuple(convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in typing.get_args(tp):
      return None
    tp = next(a for a in typing.get_args(tp) if a is not type(None))
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is tuple and value is None:
    return ()
  if tp is str and value is None:
    return ""
  if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
    raise ConfigError(f"config key {key!r} must be {tp.__name__}, got {value!r}")
  return value


def normalize_rules(raw: Any) -> Any:
  """Rules map a logical name to None, one mesh axis or a tuple of them."""
  items = raw.items() if hasattr(raw, "items") else raw
  out = []
  for name, axes in items:
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    out.append((name, tuple(axes)))
  return out
