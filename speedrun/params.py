"""Loading and validating params.yaml.

Each stage's parameters are a dataclass whose fields carry their checks (see `param`). Parsing
rejects unknown keys, wrong types and out-of-range values with a message naming the key, so a
typo in `dvc exp run -S train.lr=...` fails at stage start, not an hour into a run.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from .errors import ParamError

T = TypeVar("T")
DEFAULT_PATH = "params.yaml"


def param(default: Any, *, ge=None, gt=None, le=None, lt=None, choices=None,
          check: Callable[[Any], str | None] | None = None):
    """A dataclass field with validation metadata. `check(value)` returns an error text or None."""
    meta = dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, check=check)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def multiple_of(n: int) -> Callable[[Any], str | None]:
    """A `check=` for param(): the value must be a multiple of n."""
    return lambda v: None if v % n == 0 else f"must be a multiple of {n}"


def load_yaml(path: str | Path = DEFAULT_PATH) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path} not found (run from the project root, where params.yaml lives)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamError(f"{path} is not valid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ParamError(f"{path} must hold a mapping of stage sections")
    return data


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"params.yaml: {key} must be a list (got {value!r})")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamError(f"params.yaml: {key} must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ParamError(f"params.yaml: {key} must be an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"params.yaml: {key} must be a number (got {value!r})")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 (and `dvc exp run -S k=off`) read on/off as booleans
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ParamError(f"params.yaml: {key} must be a string (got {value!r})")
        return value
    return value


def _check_range(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    def flat(v):
        return [x for item in v for x in flat(item)] if isinstance(v, list) else [v]

    items = flat(value)
    for v in items:
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise ParamError(f"params.yaml: {key} must be one of {list(meta['choices'])} (got {v!r})")
        for op, bound, text in (("ge", meta.get("ge"), ">="), ("gt", meta.get("gt"), ">"),
                                ("le", meta.get("le"), "<="), ("lt", meta.get("lt"), "<")):
            if bound is None:
                continue
            ok = {"ge": v >= bound, "gt": v > bound, "le": v <= bound, "lt": v < bound}[op]
            if not ok:
                raise ParamError(f"params.yaml: {key} must be {text} {bound} (got {v!r})")
    if meta.get("check") is not None:
        msg = meta["check"](value)
        if msg:
            raise ParamError(f"params.yaml: {key} {msg} (got {value!r})")


def parse_section(raw: dict | None, section: str, cls: type[T]) -> T:
    """Build `cls` from `raw[section]`, validating every key; missing keys take their defaults."""
    values = (raw or {}).get(section) or {}
    if not isinstance(values, dict):
        raise ParamError(f"params.yaml: section '{section}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(f'{section}.{c}' for c in close)}?" if close
                else f"the {len(fields)} keys of {section} are documented in params.yaml")
        raise ParamError(f"params.yaml: unknown key {section}.{unknown[0]} ({hint})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{section}.{name}"
        if name in values:
            kwargs[name] = _coerce(key, values[name], hints[name])
        _check_range(key, kwargs.get(name, _default(f)), dict(f.metadata))
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()  # cross-key checks; raise ParamError naming the keys
    return obj


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def load_section(section: str, cls: type[T], path: str | Path = DEFAULT_PATH) -> T:
    return parse_section(load_yaml(path), section, cls)


def as_dict(obj) -> dict:
    return dataclasses.asdict(obj)
