"""PEP 562 lazy names for vitlab's packages: a package's public names are imported from their
submodules on first use, so `import vitlab` and the `vitlab` command's --help import no torch."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_names(package: str, table: dict[str, str], namespace: dict,
               before: Callable[[], None] | None = None) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for `package`, whose names map to submodules in `table`
    (name -> submodule, relative to the package). `before` runs once before the first lookup
    (e.g. registering every model family). Another name is an AttributeError without side effects,
    so the import system then imports a submodule of that name itself."""
    def __getattr__(name: str):
        if name in table:
            if before is not None:
                before()
            value = getattr(importlib.import_module(f"{package}.{table[name]}"), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
