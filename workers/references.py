"""`package.module:function` references in config (`model.factory`, `data.loader`).

A reference is imported the way `python -m` imports: from the working directory first, so a module
beside the config (or carried by a Ray job's `--working-dir`) is found on the driver and on every
worker. Local Ray workers start in the driver's working directory; a job's workers start in its
working directory. Errors name the config field, the reference and what went wrong.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Callable

from orchestration.errors import ConfigError

REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def check_reference(text: str, field: str) -> None:
    """Raise `ConfigError` unless `text` reads `package.module:function` (syntax only: nothing is imported)."""
    if not isinstance(text, str) or not REFERENCE.match(text):
        raise ConfigError(f"{field} must read 'package.module:function' (importable from the working directory), got {text!r}")


def import_reference(text: str, field: str) -> Callable[..., Any]:
    """The callable `text` names; `ConfigError` if the module does not import or the name is not callable."""
    check_reference(text, field)
    module_name, _, attribute = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or whatever the module raises while it runs
        raise ConfigError(f"{field} {text!r}: cannot import module {module_name!r} from {os.getcwd()} "
                          f"({type(error).__name__}: {error})") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{field} {text!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{field} {text!r}: {attribute!r} is a {type(target).__name__}, not a function")
    return target
