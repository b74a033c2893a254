"""Plugins: modules that give a server named transforms and custom sources.

A plugin is a module named in the server's config (``plugins = ["mypkg.augment"]`` or
``--plugin mypkg.augment``); importing it registers its functions::

    from batchup_server.plugins import source, transform

    @transform("crop_flip")
    def crop_flip(X, y, pad=4):          # called as fn(*batch, **params), batch by batch
        ...
        return X_aug, y

    @source("image_folder")
    def image_folder(root, size=32):      # [sources.photos] plugin = "image_folder"
        return {"X": ImageFiles(root, size), "y": labels}   # array-likes: len() and [int array]

Clients name a transform with ``ds.map("crop_flip", pad=2)``: no client code runs on the
server, so this works for servers that do not trust client code. Every worker process
imports the plugins when it starts; so does the router, to list and check names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["PluginError", "Registry", "load_plugins", "source", "transform"]

_TRANSFORMS: dict[str, Callable[..., Any]] = {}
_SOURCES: dict[str, Callable[..., Any]] = {}


class PluginError(Exception):
    """A plugin cannot be imported, or registers a name twice."""


def _register(table: dict[str, Callable[..., Any]], kind: str, name: str) -> Callable[..., Any]:
    if not isinstance(name, str) or not name:
        raise PluginError(f"a {kind} needs a non-empty name, got {name!r}")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        old = table.get(name)
        if old is not None and old is not fn and _where(old) != _where(fn):
            raise PluginError(f"{kind} {name!r} is registered twice: by {_where(old)} and by {_where(fn)}")
        table[name] = fn
        return fn

    return decorate


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def transform(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(*batch, **params)`` as the transform ``name``."""
    return _register(_TRANSFORMS, "transform", name)


def source(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``factory(**args)`` as the source kind ``name``; it returns the fields: a
    dict ``{field name: array-like}`` or a list of array-likes (named "0", "1", ...)."""
    return _register(_SOURCES, "source", name)


class Registry:
    """The transforms and sources registered by the plugins imported so far."""

    @property
    def transforms(self) -> dict[str, Callable[..., Any]]:
        return dict(_TRANSFORMS)

    @property
    def sources(self) -> dict[str, Callable[..., Any]]:
        return dict(_SOURCES)

    def transform(self, name: str) -> Callable[..., Any]:
        fn = _TRANSFORMS.get(name)
        if fn is None:
            known = ", ".join(sorted(_TRANSFORMS)) or "none: start the server with --plugin MODULE"
            raise KeyError(f"unknown transform {name!r}; this server has: {known}")
        return fn

    def source(self, name: str) -> Callable[..., Any]:
        fn = _SOURCES.get(name)
        if fn is None:
            known = ", ".join(sorted(_SOURCES)) or "none: name a plugin module in the config"
            raise KeyError(f"unknown plugin source {name!r}; the plugins register: {known}")
        return fn


def load_plugins(modules: tuple[str, ...] | list[str]) -> Registry:
    """Import each plugin module (registering its functions); the registry of all of them."""
    for module in modules:
        try:
            importlib.import_module(module)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"cannot import plugin {module!r}: {type(exc).__name__}: {exc}") from exc
    return Registry()
