"""Typed configuration: the one strict base model, and command-line flags derived from it.

Every config medray reads (manifests, Serve configs, batch-inference options, job requests,
a model directory's `medray_config.json`) is a `StrictModel`: unknown keys are errors that
name the key, assignments are validated, and a field's docstring is its description. CLI
flags are generated from those fields and descriptions (as TRL's parser and torchtitan's
JobConfig do), so an option is declared once and the CLI, `jobs/` and the API cannot drift.

This module imports nothing from medray: every package may build on it.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors; assignments are validated; attribute docstrings describe fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseModel], *, exclude: tuple[str, ...] = (),
                  positional: tuple[str, ...] = ()) -> None:
    """One flag per scalar field of `model` (`max_new_tokens` -> `--max-new-tokens`), typed, with
    the field's description as help. Unset flags stay None, so the model's defaults apply."""
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        kind = _unwrap_optional(field.annotation)
        kwargs: dict[str, Any] = {"help": field.description}
        origin = typing.get_origin(kind)
        if origin is Literal:
            kwargs["choices"] = list(typing.get_args(kind))
        elif origin in (list, tuple):
            kwargs["action"] = "append"
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float, str):
            kwargs["type"] = kind
        else:
            raise TypeError(f"{model.__name__}.{name}: no flag for type {kind!r}; exclude it and add it by hand")
        if name in positional:
            parser.add_argument(name, **kwargs)
            continue
        if field.is_required():
            kwargs["required"] = True
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kwargs)


def values_from_args(model: type[BaseModel], args: argparse.Namespace, *,
                     exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flags `add_arguments` made that were given, as field values (pass the same `exclude`)."""
    given = vars(args)
    return {name: given[name] for name in model.model_fields
            if name not in exclude and given.get(name) is not None}
