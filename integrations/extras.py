"""Names the integrations import on first use, so that each works with only the packages it
needs (`ChatICAE` with langchain-core alone) and a missing one is named with its install line."""

from __future__ import annotations

from importlib import import_module
from typing import Any

INSTALL = 'pip install "icmem[langchain]"'


def import_on_use(package: str, lazy: dict[str, str], name: str) -> Any:
    """``lazy[name]`` (a module under ``package``) imported now, and ``name`` read from it."""
    module = lazy.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    try:
        return getattr(import_module(module, package), name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in ("langchain", "langgraph"):
            raise
        raise ModuleNotFoundError(
            f"{package}.{name} needs the {exc.name.split('.')[0]} package, which is not "
            f"installed: {INSTALL}",
            name=exc.name,
        ) from exc
