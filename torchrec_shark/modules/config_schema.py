"""Hydra config sections derived from compression spec types: the spec is the one source of truth.

A spec (a frozen dataclass such as :class:`~torchrec_shark.modules.mixed_precision.MixedPrecision`) is
what a table is built from; its config section (``tables.compression.<section>``) is a mutable dataclass
with the same fields, tuples as lists and nested specs as nested sections, plus any settings the kind
reads itself (e.g. tensor train's ``min_rows``). Values are checked by the spec's own ``__post_init__``
when the spec is made from the section.

Example::

    Section = section_type(MixedPrecision)                 # dataclass: tiers (list of sections), decay, ...
    spec = MixedPrecision(**spec_kwargs(MixedPrecision, Section()))
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Dict, List, Optional, Tuple


def _convert_hint(hint):
    """The Hydra-side type of a spec field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return List[_convert_hint(args[0])]
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return Optional[_convert_hint(inner[0])]
    if dataclasses.is_dataclass(hint):
        return section_type(hint)
    return hint


def _to_section_value(value):
    if isinstance(value, tuple):
        return [_to_section_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        sec = section_type(type(value))
        return sec(**{f.name: _to_section_value(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value


@functools.lru_cache(maxsize=None)
def section_type(spec_type: type, excludes: Tuple[str, ...] = (),
                 extra: Tuple[Tuple[str, Any, Any], ...] = ()) -> type:
    """A mutable dataclass with ``spec_type``'s fields (less ``excludes``), Hydra-typed, plus ``extra``
    fields ``(name, type, default)``."""
    hints = typing.get_type_hints(spec_type)
    fields = []
    for f in dataclasses.fields(spec_type):
        if f.name in excludes or not f.init:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fields.append((f.name, _convert_hint(hints[f.name])))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, (tuple, list)) or dataclasses.is_dataclass(default):
            fields.append((f.name, _convert_hint(hints[f.name]),
                           dataclasses.field(default_factory=functools.partial(_to_section_value, default))))
        else:
            fields.append((f.name, _convert_hint(hints[f.name]), dataclasses.field(default=default)))
    for name, typ, default in extra:
        fields.append((name, typ, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{spec_type.__name__}Config", fields)


def _to_spec_value(hint, value):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin is tuple:
        return tuple(_to_spec_value(args[0], v) for v in value)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return _to_spec_value(inner[0], value)
    if dataclasses.is_dataclass(hint):
        return hint(**spec_kwargs(hint, value))
    return value


def spec_kwargs(spec_type: type, section, excludes: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """Keyword arguments of ``spec_type`` from a config section (a section dataclass, a ``DictConfig`` or a
    mapping): lists back to tuples, nested sections back to nested specs."""
    hints = typing.get_type_hints(spec_type)
    get = section.get if isinstance(section, dict) else functools.partial(getattr, section)
    out = {}
    for f in dataclasses.fields(spec_type):
        if f.name in excludes or not f.init:
            continue
        out[f.name] = _to_spec_value(hints[f.name], get(f.name))
    return out
