"""Building a :class:`~.schema.Config`: YAML files, dotted ``key=value`` overrides, presets and
the coercion of each value to its field's type."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..paths import user_path
from .schema import Config, preset, quote
from .validation import validate

# The words a bool field accepts, whether YAML left them as text or an override gave them.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True,
              "false": False, "no": False, "off": False, "0": False}
# The plain scalars a config reads as something other than text, as a person reads them: PyYAML's
# (YAML 1.1) resolvers without yes/no/on/off as booleans, 0755 as the octal 493, 1:30 as the
# sexagesimal 90, and dates. Those stay the text written, which the key's type then reads.
SCALARS = {
    "bool": ("true|True|TRUE|false|False|FALSE", "tTfF"),
    "int": (r"[-+]?0b[0-1_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+", "-+0123456789"),
    "float": (r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", "-+0123456789."),
    "null": ("~|null|Null|NULL|", ["~", "n", "N", ""]),
    "merge": ("<<", "<"),
}
MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKey(yaml.MarkedYAMLError):
    """A mapping that sets one key twice (YAML would silently keep the last)."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading a config as a person reads it: a key set twice in one
    mapping is an error, and only the plain scalars of :data:`SCALARS` are other than text."""

    yaml_implicit_resolvers: dict = {}

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise DuplicateKey(f"'{key}' set on line {seen[key] + 1}", None,
                                       "set again", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


for _tag, (_pattern, _first) in SCALARS.items():
    ConfigLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}",
                                       re.compile(f"^(?:{_pattern})$"), list(_first))


def read_yaml(text: str):
    """The YAML document ``text`` as :class:`ConfigLoader` reads it."""
    return yaml.load(text, Loader=ConfigLoader)


def deep_merge(base: dict, upd: dict) -> dict:
    """``base`` updated with ``upd``, nested mappings merged key by key (``upd`` winning)."""
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _as_number(value: Any, tp: type) -> Any:
    """``value`` as ``tp`` (int or float): a number of that kind (an integral float for int) or
    a string that parses as one; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            return None
    if isinstance(value, int) or (isinstance(value, float) and (tp is float or value.is_integer())):
        return tp(value)
    return None


def convert(name: str, value: Any, tp: Any) -> Any:
    """``value`` (as YAML or Python gives it) as the type ``tp`` of the key or section ``name``,
    strictly: a section is a mapping of its own keys, a list a list (one bare value: a list of
    one), a number a number, empty only where the type is Optional; anything else is one
    ``ConfigError`` line naming the key."""
    if dataclasses.is_dataclass(tp):
        return _section(tp, {} if value is None and name else value, name)
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        if value is None or isinstance(value, dict):
            raise ConfigError(f"config key '{name}' expects a list of {item_type.__name__}, got "
                              f"{value!r} ({type(value).__name__}); write e.g. [a, b], or [] "
                              f"for none")
        items = value if isinstance(value, list) else [value]
        return [convert(f"{name}[{i}]", item, item_type) for i, item in enumerate(items)]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = typing.get_origin(tp) is typing.Union and len(args) == 1
    tp = args[0] if optional else tp
    article = "an" if tp.__name__[0] in "aeiou" else "a"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{name}' may not be empty; give it {article} "
                          f"{tp.__name__} value")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
    elif tp in (int, float):
        number = _as_number(value, tp)
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(
        f"config key '{name}' expects {article} {tp.__name__}, got {value!r} "
        f"({type(value).__name__}); fix the value in the YAML file or the override")


def _section(cls: type, data: Any, name: str) -> Any:
    """The dataclass ``cls`` from the mapping ``data`` of the section ``name`` ('' for the whole
    config): unknown keys refused, a path key's ``~`` expanded, absent keys at their default."""
    prefix = f"{name}." if name else ""
    if not isinstance(data, dict):
        if not name:
            raise ConfigError("a config must be a mapping with sections model, objective, "
                              "data, train, sample")
        raise ConfigError(f"config section '{name}' must be a mapping of keys to values, got "
                          f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key {quote(f'{prefix}{key}')}{hint}; valid keys "
                              f"in this section: {', '.join(fields)}")
        kwargs[key] = convert(prefix + key, value, hints[key])
        if fields[key].metadata.get("path"):
            kwargs[key] = user_path(kwargs[key])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'model.moe.num_experts=8'`` → ``(['model', 'moe', 'num_experts'], 8)``."""
    if "=" not in text:
        raise ConfigError(f"override {quote(text)} is not of the form key=value "
                          f"(e.g. model.moe.num_experts=8)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {quote(text)} has an empty key; write e.g. train.steps=100")
    try:
        value = read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def nest(settings: list[tuple[str, Any, str]]) -> dict:
    """``[(dotted key or section, value, as the user wrote it), ...]`` as one nested dict, later
    settings winning and a section's mapping merged key by key; a key set inside a value that is
    no section (``a=1`` then ``a.b=2``) is an error."""
    out: dict = {}
    for name, value, written in settings:
        *sections, last = name.split(".")
        node = out
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {quote(written)} conflicts with an earlier "
                                  f"override")
        merge = isinstance(value, dict) and isinstance(node.get(last), dict)
        node[last] = deep_merge(node[last], value) if merge else value
    return out


def overrides_to_dict(overrides: list[str]) -> dict:
    parsed = [(parse_override(text), text) for text in overrides]
    return nest([(".".join(path), value, text) for (path, value), text in parsed])


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config from a nested dict (preset applied first)."""
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and model.get("preset"):
        data = deep_merge({"model": preset(str(model["preset"]))}, data)
    cfg = convert("", data, Config)
    validate(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a YAML file such as "
                          f"configs/mnist_diffmoe.yaml")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as "
                          f"configs/mnist_diffmoe.yaml")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror
        raise ConfigError(f"config file '{path}' cannot be read ({reason}); pass a YAML "
                          f"file") from None
    try:
        data = read_yaml(text)
    except DuplicateKey as exc:
        raise ConfigError(f"config file '{path}' sets a key twice: {exc.context} and again on "
                          f"line {exc.problem_mark.line + 1} (YAML would keep only the last); "
                          f"delete one") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}; "
                          f"fix its syntax") from None
    if data is None or data == {}:
        raise ConfigError(f"config file '{path}' is empty: it sets nothing, and the defaults "
                          f"alone are no experiment; start from a file in configs/, e.g. "
                          f"configs/mnist_diffmoe.yaml")
    return data


def config_with(config: Config | str | Path | dict, overrides: dict[str, Any]) -> Config:
    """A config from Python: ``config`` (a :class:`Config`, a YAML path or a mapping of
    sections) updated with ``overrides``, whose keys are dotted (``{"train.steps": 50}``) or
    sections (``train={"steps": 50}``); checked as a YAML file is."""
    if isinstance(config, Config):
        data = config.to_dict()
    elif isinstance(config, dict):
        data = config
    elif isinstance(config, (str, Path)):
        data = load_yaml(config)
    else:
        raise ConfigError(f"config must be a Config, a YAML path or a dict, got "
                          f"{type(config).__name__}")
    return config_from_dict(deep_merge(data, nest([(k, v, k) for k, v in overrides.items()])))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = load_yaml(path) if path is not None else {}
    if overrides:
        data = deep_merge(data, overrides_to_dict(overrides))
    return config_from_dict(data)
