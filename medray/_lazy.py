"""Packages whose public names are imported on first use (PEP 562).

A package's `__init__` names what it offers; importing it loads none of the modules behind
those names. `medray --help`, a Serve ingress and a config parser import medray.models or
medray.infer for light things (family names, request types, option models), and an eager
`__init__` made each of them load torch and transformers first: about 1.5 s per command
and a few hundred MB per ingress replica, for nothing they use.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, modules: dict[str, list[str]]):
    """`__getattr__` and `__dir__` for `package`, which exports each name of `modules` (a
    relative module name -> the names it defines) from that module, imported when a name is
    first asked for and then kept in the package like an eager import would."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
