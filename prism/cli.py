"""One command-line style for ``python -m prism``, ``python -m prism.eval`` and the benchmarks.

A command declares its options as a dataclass; :func:`parse_cli` turns ``argv`` into an instance::

    @dataclasses.dataclass
    class Args:
        length: int = 8192
        scorers: list[str] = dataclasses.field(default_factory=lambda: ["prism"])
        threshold: float | None = dataclasses.field(default=None, metadata={"help": "top-p"})

    args = parse_cli(Args, ["length=16384", "scorers=[prism,xattn]"])

Arguments, applied left to right on top of the dataclass defaults:

* ``key=value`` -- an omegaconf dotlist override (``a.b=1``, ``xs=[1,2]``; values parse as YAML);
* ``--config FILE.yaml`` -- a YAML mapping merged first, before every override (unless the
  dataclass has its own ``config`` field, which ``--config`` then sets like any other flag);
* ``--key VALUE`` / ``--key=VALUE`` -- the same as ``key=VALUE`` (dashes become underscores), kept
  so argparse-era flags go on working; for a bool field ``--key`` alone is ``key=true`` and
  ``--no-key`` is ``key=false``; for a list field ``--key a b c`` collects the values up to the
  next flag or ``key=value``; ``aliases`` maps other old flag names to keys;
* one bare word, when ``positional`` names the field it sets;
* with ``passthrough=True``, ``key=value`` items for keys that are not fields are returned
  apart instead of failing (a command that forwards overrides to a config of its own);
* ``-h`` / ``--help`` prints every key with its type, default and help text, and exits 0.

Values are type-checked against the dataclass (``OmegaConf.structured``); an unknown key or a value
of the wrong type prints an error that lists the valid keys and exits with status 2, as argparse
does.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
_UnionType = getattr(types, "UnionType", None)  # ``int | None`` (Python 3.10+)

__all__ = ["parse_cli", "cli_keys", "cli_help"]


def _field_types(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable annotation strings: fall back to the raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    text = str(tp).replace("typing.", "")
    return text.replace("NoneType", "None")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _leaf_kind(tp: Any) -> str:
    """``"bool"``, ``"list"`` or ``"other"`` for a field type (``Optional`` unwrapped)."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union or (_UnionType is not None and origin is _UnionType):
        if len(args) == 1:
            return _leaf_kind(args[0])
        return "other"
    if tp is bool:
        return "bool"
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return "list"
    return "other"


def cli_keys(cls) -> dict[str, tuple[Any, Any, str]]:
    """Every dotted key of a (possibly nested) dataclass: ``{key: (type, default, help)}``."""
    out: dict[str, tuple[Any, Any, str]] = {}
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        help_text = f.metadata.get("help", "") if f.metadata else ""
        if _is_dataclass_type(tp):
            for key, val in cli_keys(tp).items():
                out[f"{f.name}.{key}"] = val
        else:
            out[f.name] = (tp, _default(f), help_text)
    return out


def cli_help(cls, prog: str | None = None, description: str = "", positional: str | None = None):
    """The ``--help`` text of :func:`parse_cli`."""
    prog = prog or _prog()
    lines = [_usage(prog, "config" in cli_keys(cls), positional)]
    if description:
        lines += ["", description.strip()]
    lines += ["", "options (key=value, or --key value; lists as key=[a,b]):"]
    keys = cli_keys(cls)
    width = max([len(k) for k in keys] + [8])
    for key, (tp, default, help_text) in keys.items():
        line = f"  {key:<{width}}  {_type_name(tp)} = {default!r}"
        if help_text:
            line += f"  -- {help_text}"
        lines.append(line)
    return "\n".join(lines)


def _usage(prog: str, has_config_field: bool, positional: str | None) -> str:
    line = f"usage: {prog} [-h]" + ("" if has_config_field else " [--config FILE.yaml]")
    if positional:
        line += f" [{positional.upper()}]"
    return line + " [key=value ...]"


def _prog() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        return f"python -m {name}"
    return sys.argv[0] if sys.argv and sys.argv[0] else "prism"


class _Fail(Exception):
    pass


def _to_dotlist(
    argv: Sequence[str],
    keys: Mapping[str, tuple[Any, Any, str]],
    aliases: Mapping[str, str],
    positional: str | None,
    has_config_field: bool,
) -> tuple[list[str], list[str], bool]:
    """``argv`` -> (config files, dotlist items, help requested)."""
    files: list[str] = []
    items: list[str] = []
    bare: list[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            return files, items, True
        if not arg.startswith("--"):
            if "=" in arg and not arg.startswith("-"):
                items.append(arg)
            else:
                bare.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        if name in aliases:
            name = aliases[name]
        key = name.replace("-", "_")
        negated = False
        if key not in keys and key.startswith("no_") and key[3:] in keys:
            key, negated = key[3:], True
        if key == "config" and not has_config_field:
            if not eq:
                if i >= len(argv):
                    raise _Fail("--config needs a YAML file")
                value = argv[i]
                i += 1
            files.append(value)
            continue
        if key not in keys:
            raise _Fail(f"unknown option --{name}")
        kind = _leaf_kind(keys[key][0])
        if negated:
            if kind != "bool" or eq:
                raise _Fail(f"--no-{name[3:]} is only for a bool key")
            items.append(f"{key}=false")
        elif eq:
            items.append(f"{key}={value}")
        elif kind == "bool":
            items.append(f"{key}=true")
        elif kind == "list":
            vals = []
            while i < len(argv) and not argv[i].startswith("--") and "=" not in argv[i]:
                vals.append(argv[i])
                i += 1
            items.append(f"{key}=[{','.join(vals)}]")
        else:
            if i >= len(argv):
                raise _Fail(f"--{name} needs a value")
            items.append(f"{key}={argv[i]}")
            i += 1
    if bare:
        if positional is None or len(bare) > 1:
            raise _Fail(
                f"unexpected argument(s) {bare}: options are key=value (or --key value)"
                + (f"; one {positional.upper()} at most" if positional else "")
            )
        items.insert(0, f"{positional}={bare[0]}")
    return files, items, False


def parse_cli(
    defaults: type[T],
    argv: Sequence[str] | None = None,
    description: str = "",
    *,
    aliases: Mapping[str, str] | None = None,
    positional: str | None = None,
    prog: str | None = None,
    passthrough: bool = False,
):
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of the dataclass ``defaults``.

    ``aliases`` maps other flag names (without the dashes, e.g. ``{"n": "length"}``) to keys;
    ``--no-KEY`` for a bool key needs no alias. ``positional`` names the field that one bare
    argument sets. With ``passthrough=True`` a ``key=value`` item whose key is not a field is not
    an error: the call returns ``(instance, [those items in order])`` (``python -m prism.eval``
    hands them to the experiment config). See the module docstring for the argument forms.
    Exits 0 after ``--help`` and 2 on an unknown key or a badly typed value.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not (isinstance(defaults, type) and dataclasses.is_dataclass(defaults)):
        raise TypeError(f"parse_cli needs a dataclass type, got {defaults!r}")
    argv = list(sys.argv[1:] if argv is None else argv)
    keys = cli_keys(defaults)
    has_config_field = "config" in keys
    prog = prog or _prog()

    def fail(msg: str):
        valid = ", ".join(keys)
        print(_usage(prog, has_config_field, positional), file=sys.stderr)
        print(f"{prog}: error: {msg}\nvalid keys: {valid}", file=sys.stderr)
        raise SystemExit(2)

    try:
        files, items, want_help = _to_dotlist(
            argv, keys, dict(aliases or {}), positional, has_config_field
        )
    except _Fail as exc:
        fail(str(exc))
    if want_help:
        print(cli_help(defaults, prog, description, positional))
        raise SystemExit(0)
    try:
        cfg = OmegaConf.structured(defaults)
    except OmegaConfBaseException as exc:  # a field type omegaconf cannot check (a bug in Defaults)
        raise TypeError(f"{defaults.__name__} is not a valid omegaconf schema: {exc}") from exc
    layers = []
    for path in files:
        try:
            layer = OmegaConf.load(path)
        except (OSError, OmegaConfBaseException) as exc:
            fail(f"--config {path}: {exc}")
        if not OmegaConf.is_dict(layer):
            fail(f"--config {path}: the file is not a mapping")
        layers.append((f"--config {path}", layer))
    rest: list[str] = []
    for item in items:
        if "=" not in item:
            fail(f"{item!r} is not key=value")
        key = item.split("=", 1)[0].strip()
        if not any(key == k or k.startswith(key + ".") or key.startswith(k + ".") for k in keys):
            if passthrough:
                rest.append(item)
                continue
            fail(f"unknown key {key!r}")
        try:
            layers.append((item, OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            fail(f"{item!r}: {exc}")
    for what, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            msg = str(exc).split("\n")[0]
            fail(f"{what}: {msg}")
    try:
        out = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # a required (MISSING) field left unset
        fail(str(exc).split("\n")[0])
    return (out, rest) if passthrough else out
