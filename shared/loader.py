"""Loading the user's own code by import path: ``"package.module:attribute"``.

Code is imported only from the local machine (the party's own ``sys.path``), never from a
message: an import path travels in configuration files the party's operator wrote, and
nothing a peer sends is ever turned into one.
"""
from __future__ import annotations

import importlib
import re
from typing import Any

_PATH_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
#: Objects handed to the Python API in this process, by the name peers compare (``register``).
_REGISTRY: dict[str, Any] = {}


def register(obj: Any) -> str:
    """Make an object given to the Python API loadable by name in this process.

    The name is the object's import path (``module:qualname``; for an instance, its class's
    with ``()``), which is what the parties of a job compare: a peer in another process loads
    the same name from its own machine (or is handed its own object the same way).
    """
    if isinstance(obj, (list, tuple)):  # segments given as a list of modules
        name = "segments:" + "+".join(f"{type(m).__module__}.{type(m).__qualname__}" for m in obj)
        _REGISTRY[name] = obj
        return name
    target = obj if callable(obj) and not _is_module_instance(obj) else type(obj)
    name = f"{target.__module__}:{target.__qualname__}" + ("()" if target is not obj else "")
    _REGISTRY[name] = obj
    return name


def _is_module_instance(obj: Any) -> bool:
    return hasattr(obj, "state_dict") and not isinstance(obj, type)


def load_object(path: str, *, what: str) -> Any:
    """Import ``package.module`` and return its (possibly dotted) ``attribute``.

    Raises:
        ValueError: a malformed path, a module that cannot be imported, or a missing attribute;
            the message says which, for the user to fix the ``what`` setting.
    """
    if path in _REGISTRY:
        return _REGISTRY[path]
    if not _PATH_RE.match(path):
        raise ValueError(f"{what} {path!r} must look like 'package.module:name'")
    module_name, _, attribute = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {path!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: {module_name!r} has no {attribute!r}")
        obj = getattr(obj, part)
    return obj
