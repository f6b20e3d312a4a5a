"""Typed, documented config classes, and the JSON Schema and recipe checks generated from them.

Every option a recipe can set is a dataclass field made with `option(default, help=...)`. The same
field gives the recipe's JSON Schema (`schemas/pipeline.schema.json`), the checks `curate validate`
and `curate run` make, the error hints, and `curate stages`: one source, so they cannot drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from typing import Any

import jsonschema

from curate.errors import Issue, RecipeError


def option(default: Any = dataclasses.MISSING, help: str = "", **schema: Any) -> Any:  # noqa: A002
    """A config field with its documentation (printed by `curate stages`) and any extra JSON Schema
    keywords that bound it (`minimum=1`, `exclusiveMinimum=0`, ...)."""
    metadata = {"help": help, "schema": schema}
    if default is not dataclasses.MISSING and isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=default, metadata=metadata)


def recipe_fields(config_cls: type) -> list[dataclasses.Field]:
    """The fields a recipe may set (a field with `recipe=False` in its metadata is internal)."""
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("recipe", True)]


def config_schema(config_cls: type, nullable: bool = False) -> dict:
    """The JSON Schema of a config class: one property per option, nothing else allowed."""
    hints = typing.get_type_hints(config_cls)
    properties = {}
    required = []
    for f in recipe_fields(config_cls):
        prop = dict(f.metadata.get("schema_override") or type_schema(hints[f.name]))
        prop.update(f.metadata.get("schema", {}))
        if f.metadata.get("help"):
            prop["description"] = f.metadata["help"]
        default = _default(f)
        if default is dataclasses.MISSING:
            required.append(f.name)
        elif _jsonable(default):
            prop["default"] = default
        properties[f.name] = prop
    schema: dict[str, Any] = {"type": ["object", "null"] if nullable else "object"}
    if config_cls.__doc__ and not config_cls.__doc__.startswith(config_cls.__name__ + "("):
        schema["description"] = " ".join(config_cls.__doc__.split())
    schema["properties"] = properties
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def type_schema(tp: Any) -> dict:
    """The JSON Schema of a type hint (str, int, float, bool, None, Literal, list, dict, unions,
    nested config dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return {}
    if dataclasses.is_dataclass(tp):
        return config_schema(tp)
    if origin is typing.Union or origin is types.UnionType:
        options = [type_schema(a) for a in typing.get_args(tp)]
        simple = [o for o in options if set(o) == {"type"} and isinstance(o["type"], str)]
        if len(simple) == len(options):
            return {"type": [o["type"] for o in options]}
        return {"anyOf": options}
    if origin is typing.Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return {"type": "array", "items": type_schema(item)}
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        return {"type": "object", **({"additionalProperties": type_schema(args[1])} if args else {})}
    names = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
    if tp in names:
        return {"type": names[tp]}
    raise TypeError(f"no JSON Schema for the option type {tp!r}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


# checking ---------------------------------------------------------------------------------------


def schema_issues(schema: dict, instance: Any, where: str = "", noun: str = "key") -> list[Issue]:
    """Every place where `instance` breaks `schema`, as issues that name the key and give a hint.
    `noun` is what an unknown key is called ("option" for a stage's options)."""
    validator = jsonschema.Draft202012Validator(schema)
    issues = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]):
        issues.append(_issue(_specific(error), where, noun))
    return issues


def _specific(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """For a value no branch of an anyOf accepts, the error of the branch whose type it has."""
    while error.validator in ("anyOf", "oneOf") and error.context:
        fitting = [e for e in error.context if not (e.validator == "type" and not e.relative_path)]
        if not fitting:
            break
        error = min(fitting, key=lambda e: -len(e.relative_path))
    return error


def _issue(error: jsonschema.ValidationError, where: str, noun: str) -> Issue:
    path = list(error.absolute_path)
    hint = error.schema.get("description", "") if isinstance(error.schema, dict) else ""
    message = error.message
    if error.validator == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in known]
        name = extra[0] if extra else "?"
        close = difflib.get_close_matches(str(name), known, n=1)
        if (len(path) >= 2 and path[0] == "stages") or (path and path[-1] == "options"):
            noun = "option"
        message = f"unknown {noun} '{name}'"
        hint = f"did you mean '{close[0]}'?" if close else f"known {noun}s: {', '.join(known)}"
    elif error.validator == "type":
        expected = error.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        message = f"expected {expected}, got {error.instance!r}"
    elif error.validator in ("anyOf", "oneOf") and all(e.validator == "type" for e in error.context):
        expected = [
            t
            for e in error.context
            for t in ([e.validator_value] if isinstance(e.validator_value, str) else e.validator_value)
        ]
        message = f"expected {' or '.join(dict.fromkeys(expected))}, got {error.instance!r}"
    elif error.validator == "enum":
        choices = [str(v) for v in error.validator_value]
        close = difflib.get_close_matches(str(error.instance), choices, n=1)
        title = error.schema.get("title")
        message = (
            f"unknown {title} {error.instance!r}"
            if title
            else f"{error.instance!r} is not one of {', '.join(choices)}"
        )
        hint = f"did you mean '{close[0]}'?" if close else f"one of {', '.join(choices)}"
    elif error.validator in ("minProperties", "maxProperties") and error.schema.get("maxProperties") == 1:
        keys = ", ".join(map(str, error.instance)) or "none"
        message = f"one key per item, got {keys}"
    elif error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        path = [*path, missing[0]] if missing else path
        message = "required"
        described = (
            error.schema.get("properties", {}).get(missing[0], {}).get("description") if missing else ""
        )
        hint = described or ("" if error.absolute_path else "see pipelines/demo.yaml for a complete recipe")
    return Issue(key_path(path, where) or "recipe", message, hint)


def key_path(parts: Any, where: str = "") -> str:
    """`stages[2].dedup.minhash` from ["stages", 2, "dedup", "minhash"]."""
    out = where
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def build_config(config_cls: type, options: dict | None, where: str) -> Any:
    """Recipe options -> the config dataclass: checked against its schema, then its own `check()`."""
    issues = schema_issues(config_schema(config_cls, nullable=True), options, where, noun="option")
    if issues:
        raise RecipeError(issues)
    config, issues = make_config(config_cls, options, where)
    if issues:
        raise RecipeError(issues)
    return config


def make_config(config_cls: type, options: dict | None, where: str) -> tuple[Any, list[Issue]]:
    """The config of schema-valid options, and what its `check()` (rules across options) finds."""
    hints = typing.get_type_hints(config_cls)
    values = {}
    for key, value in (options or {}).items():
        nested = _dataclass_in(hints[key])
        if nested is not None and isinstance(value, dict):
            value, issues = make_config(nested, value, f"{where}.{key}")
            if issues:
                return None, issues
        values[key] = value
    config = config_cls(**values)
    check = getattr(config, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:  # ValueError(message) or ValueError(message, hint)
            return config, [Issue(where, str(exc.args[0]), str(exc.args[1]) if len(exc.args) > 1 else "")]
    return config, []


def _dataclass_in(tp: Any) -> type | None:
    for arg in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def describe_config(config_cls: type, prefix: str = "") -> list[dict]:
    """Options of a config, for `curate stages`: name, type, default, help (nested ones dotted)."""
    hints = typing.get_type_hints(config_cls)
    rows = []
    for f in recipe_fields(config_cls):
        default = _default(f)
        rows.append(
            {
                "name": prefix + f.name,
                "type": type_name(hints[f.name]),
                "default": None if default is dataclasses.MISSING else default,
                "help": f.metadata.get("help", ""),
            }
        )
        nested = _dataclass_in(hints[f.name])
        if nested is not None:
            rows.extend(describe_config(nested, prefix=f"{prefix}{f.name}."))
    return rows


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))
