"""Client functions for ``ds.map(fn)``, pickled by value for a server that trusts them."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["pickle_function"]


def pickle_function(fn: Any) -> bytes:
    """cloudpickle ``fn``, by value for code the server could not import (see register_code)."""
    import sys
    import sysconfig

    import cloudpickle

    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    registered = None
    path = getattr(module, "__file__", None) if module is not None else None
    if module is not None and module.__name__ != "__main__" and path:
        installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
        if not any(os.path.abspath(path).startswith(os.path.abspath(p) + os.sep) for p in installed):
            try:
                cloudpickle.register_pickle_by_value(module)
                registered = module
            except ValueError:  # pragma: no cover - e.g. a module missing from sys.modules
                registered = None
    try:
        return cloudpickle.dumps(fn)  # type: ignore[no-any-return]
    finally:
        if registered is not None:
            cloudpickle.unregister_pickle_by_value(registered)
