"""Server configuration: command-line options plus an optional TOML file of sources.

Example ``server.toml``::

    [server]
    bind = "tcp://127.0.0.1:5555"
    workers = 2
    plugins = ["mypkg.augment"]            # modules registering transforms and sources
    trust_client_code = false              # run functions clients ship for map() (cloudpickle)
    curve_secret_key = "keys/server.key_secret"   # CurveZMQ: the server's key pair ...
    curve_clients = "keys/clients"         # ... and a folder of authorised clients' NAME.key files

    [sources.train]                        # .npy files, memory-mapped
    npy = { X = "train_X.npy", y = "train_y.npy" }

    [sources.test]                         # every array of an .npz (or `keys = [...]`)
    npz = "test.npz"

    [sources.big]                          # datasets inside an HDF5 file
    hdf5 = "big.h5"
    datasets = { X = "train/X", y = "train/y" }

    [sources.photos]                       # a source a plugin registers (@source("image_folder"))
    plugin = "image_folder"
    args = { root = "/data/photos", size = 32 }

    [datasets]                             # the standard datasets (mnist, cifar10, ...)
    home = "/data/batchup"                 # batchup home; default: ~/.batchup.cfg, $BATCHUP_HOME, ~/.batchup
    download = true                        # fetch a dataset on its first request
    mirrors = { mnist = ["https://mirror.example/mnist/"] }   # tried before the built-in URLs
    builtin_mirrors = true
    sha256 = { mnist = { "train-images-idx3-ubyte.gz" = "..." } }  # private copies

Relative paths are resolved against the TOML file's folder.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from typing import Any

from .datasets.store import DatasetSettings
from .security import insecure_bind_message, is_loopback_endpoint
from .sources import FieldSpec, SourceSpec

__all__ = ["ConfigError", "ServerConfig", "load_config"]

DEFAULT_BIND = "tcp://127.0.0.1:5555"


class ConfigError(ValueError):
    """The configuration file or an option is invalid."""


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything a server needs to run; each default is what ``--help`` shows."""

    bind: str = DEFAULT_BIND
    workers: int = 2
    heartbeat_interval: float = 1.0  #: seconds between heartbeats each way
    client_timeout: float = 30.0  #: a silent client's streams are reclaimed after this
    max_message_bytes: int = 1 << 30  #: largest batch or upload chunk accepted/sent
    max_credit_batches: int = 256  #: a client may not grant more batches in flight (told in Welcome)
    max_upload_bytes: int = 16 << 30  #: largest client array accepted
    #: client arrays no open stream uses are kept for reuse up to this many bytes (least
    #: recently used deleted first; a client re-sends one it needs again)
    idle_array_bytes: int = 4 << 30
    max_clients: int = 256  #: clients served at once (each has sockets in every process)
    max_streams_per_client: int = 256  #: streams a client may have open at once
    #: a stream's shared-memory slot pool is sized from its byte budget
    #: (OpenStream.credit_bytes) cut to this (and has at least 4 slots); batches as frames
    #: are bounded by the stream's credit_batches
    max_credit_bytes: int = 1 << 30
    token: str = ""  #: when set, a Hello must carry this token
    trust_client_code: bool = False  #: run functions clients ship for ``map`` (cloudpickle)
    plugins: tuple[str, ...] = ()  #: modules whose transforms and sources the server offers
    parent_pid: int = 0  #: exit when this process dies (embedded servers)
    sources: dict[str, SourceSpec] = dataclasses.field(default_factory=dict)
    npz: dict[str, tuple[str, list[str] | None]] = dataclasses.field(default_factory=dict)
    plugin_sources: dict[str, tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    demo: bool = True  #: serve the built-in "demo" source
    datasets: DatasetSettings = dataclasses.field(default_factory=DatasetSettings)
    curve_secret_key: str = ""  #: the server's CURVE ``NAME.key_secret`` file ("" = no CURVE)
    curve_clients: str = ""  #: folder of authorised clients' public ``NAME.key`` files
    insecure: bool = False  #: allow a non-loopback bind without CURVE keys
    health_bind: str = ""  #: loopback/ipc endpoint answering handshakes without keys ("" = none)

    @property
    def curve(self) -> bool:
        """Whether the server authenticates and encrypts with CURVE."""
        return bool(self.curve_secret_key)

    def _check_types(self) -> None:
        """Each plain option has its default's type (TOML "2" for 2 is a clear error here,
        not a TypeError deep in the start-up)."""
        for f in dataclasses.fields(self):
            if f.default is dataclasses.MISSING or isinstance(f.default, tuple):
                continue
            value, kind = getattr(self, f.name), type(f.default)
            if kind is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind)
            if not ok:
                what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
                    kind, kind.__name__
                )
                raise ConfigError(f"{f.name} should be {what}, but got {f.name}={value!r}")

    def __post_init__(self) -> None:
        self._check_types()
        if self.workers < 1:
            raise ConfigError(f"workers should be >= 1, but got workers={self.workers}")
        for name, most in (
            ("max_clients", MAX_CLIENTS),
            ("max_streams_per_client", 1 << 20),
            ("max_credit_bytes", 1 << 62),
        ):
            if not 1 <= getattr(self, name) <= most:
                raise ConfigError(f"{name} should be in [1, {most}], but got {name}={getattr(self, name)}")
        if self.idle_array_bytes < 0:
            raise ConfigError(
                f"idle_array_bytes should be >= 0, but got idle_array_bytes={self.idle_array_bytes}"
            )
        if self.heartbeat_interval <= 0 or self.client_timeout <= self.heartbeat_interval:
            raise ConfigError(
                "client_timeout should exceed heartbeat_interval > 0, but got "
                f"heartbeat_interval={self.heartbeat_interval}, client_timeout={self.client_timeout}"
            )
        if isinstance(self.plugins, list):
            object.__setattr__(self, "plugins", tuple(self.plugins))
        if not all(isinstance(m, str) and m for m in self.plugins):
            raise ConfigError(f"plugins should be a list of module names, got {self.plugins!r}")
        if "://" not in self.bind:
            raise ConfigError(f"bind should be an endpoint like tcp://127.0.0.1:5555, got {self.bind!r}")
        if bool(self.curve_secret_key) != bool(self.curve_clients):
            raise ConfigError(
                "CURVE needs both curve_secret_key (--curve-secret-key, the server's NAME.key_secret) "
                "and curve_clients (--curve-clients, a folder of authorised clients' NAME.key files)"
            )
        if not self.curve and not self.insecure and not is_loopback_endpoint(self.bind):
            raise ConfigError(insecure_bind_message(self.bind))
        if self.health_bind and not is_loopback_endpoint(self.health_bind):
            raise ConfigError(
                f"health_bind should be a loopback or ipc endpoint (it answers without keys), e.g. "
                f"tcp://127.0.0.1:5556 or ipc:///run/batchup-health; got {self.health_bind!r}"
            )


#: the most clients a server may serve: each has a socket in the router and in every
#: worker, within ZeroMQ's MAX_SOCKETS that the server sets (:data:`ZMQ_MAX_SOCKETS`)
MAX_CLIENTS = 4000
ZMQ_MAX_SOCKETS = MAX_CLIENTS + 96

#: the options of each kind of source table
SOURCE_KEYS = {
    "npy": {"npy"},
    "npz": {"npz", "keys"},
    "hdf5": {"hdf5", "datasets"},
    "plugin": {"plugin", "args"},
}
#: the sections of a config file
SECTIONS = ("server", "sources", "datasets")


def _source_from_table(name: str, table: dict[str, Any], base: str) -> tuple[str, Any]:
    def path(p: Any) -> str:
        if not isinstance(p, str):
            raise ConfigError(f"sources.{name}: a path should be a string, got {p!r}")
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    if not isinstance(table, dict):
        raise ConfigError(f"sources.{name} should be a table ([sources.{name}]), got {table!r}")
    kinds = [k for k in SOURCE_KEYS if k in table]
    if len(kinds) != 1:
        raise ConfigError(f"sources.{name} should have exactly one of npy, npz, hdf5, plugin; got {kinds}")
    kind = kinds[0]
    unknown = sorted(set(table) - SOURCE_KEYS[kind])
    if unknown:
        raise ConfigError(
            f"sources.{name} ({kind}) has unknown option(s) {unknown}; known: {sorted(SOURCE_KEYS[kind])}"
        )
    if kind == "plugin":
        args = table.get("args", {})
        if not isinstance(table["plugin"], str) or not isinstance(args, dict):
            raise ConfigError(f"sources.{name}: plugin should name a plugin source and args be a table")
        return "plugin", (table["plugin"], args)
    if kind == "npy":
        fields = table["npy"]
        if not isinstance(fields, dict) or not fields:
            raise ConfigError(f"sources.{name}.npy should map field names to .npy paths")
        return "spec", SourceSpec(name, tuple(FieldSpec(k, "npy", path(v)) for k, v in fields.items()))
    if kind == "npz":
        keys = table.get("keys")
        if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise ConfigError(f"sources.{name}.keys should be a list of array names")
        return "npz", (path(table["npz"]), keys)
    datasets = table.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise ConfigError(f"sources.{name}.datasets should map field names to HDF5 dataset paths")
    h5 = path(table["hdf5"])
    return "spec", SourceSpec(name, tuple(FieldSpec(k, "h5", h5, str(v)) for k, v in datasets.items()))


def _datasets_from_table(table: Any, base: str) -> DatasetSettings:
    if not isinstance(table, dict):
        raise ConfigError("[datasets] should be a table")
    known = {f.name for f in dataclasses.fields(DatasetSettings)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"[datasets] has unknown option(s) {unknown}; known: {sorted(known)}")
    values = dict(table)
    if "home" in values:
        if not isinstance(values["home"], str):
            raise ConfigError("datasets.home should be a path")
        values["home"] = os.path.normpath(os.path.join(base, os.path.expanduser(values["home"])))
    for key in ("download", "builtin_mirrors"):
        if key in values and not isinstance(values[key], bool):
            raise ConfigError(f"datasets.{key} should be true or false, got {values[key]!r}")
    mirrors = values.get("mirrors", {})
    if not isinstance(mirrors, dict) or not all(
        isinstance(v, list) and all(isinstance(u, str) for u in v) for v in mirrors.values()
    ):
        raise ConfigError("datasets.mirrors should map dataset names to lists of base URLs")
    values["mirrors"] = {k: tuple(v) for k, v in mirrors.items()}
    sums = values.get("sha256", {})
    if not isinstance(sums, dict) or not all(
        isinstance(v, dict) and all(isinstance(h, str) for h in v.values()) for v in sums.values()
    ):
        raise ConfigError("datasets.sha256 should map dataset names to {file name = sha256} tables")
    from .datasets.catalog import UnknownDatasetError, lookup

    try:
        values["mirrors"] = {lookup(k).name: v for k, v in values["mirrors"].items()}
        values["sha256"] = {lookup(k).name: dict(v) for k, v in sums.items()}
    except UnknownDatasetError as exc:
        raise ConfigError(f"[datasets]: {exc}") from exc
    for key in ("timeout", "attempts"):
        if key in values and (not isinstance(values[key], int | float) or values[key] <= 0):
            raise ConfigError(f"datasets.{key} should be a positive number, got {values[key]!r}")
    return DatasetSettings(**values)


def load_config(path: str | None, **overrides: Any) -> ServerConfig:
    """Read ``path`` (TOML) and apply command-line ``overrides`` (``None`` = not given)."""
    values: dict[str, Any] = {}
    sources: dict[str, SourceSpec] = {}
    npz: dict[str, tuple[str, list[str] | None]] = {}
    plugin_sources: dict[str, tuple[str, dict[str, Any]]] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        base = os.path.dirname(os.path.abspath(path))
        unknown = sorted(set(doc) - set(SECTIONS))
        if unknown:
            raise ConfigError(
                f"config file {path} has unknown section(s) {unknown}; known: {list(SECTIONS)} "
                "(a source is [sources.NAME])"
            )
        server = doc.get("server", {})
        known = {f.name for f in dataclasses.fields(ServerConfig)} - {
            "sources",
            "npz",
            "datasets",
            "plugin_sources",
        }
        for key, value in server.items():
            if key not in known:
                raise ConfigError(f"[server] has unknown option {key!r}; known: {sorted(known)}")
            values[key] = value
        for key in ("curve_secret_key", "curve_clients"):  # paths, relative to the TOML file
            if isinstance(values.get(key), str) and values[key]:
                values[key] = os.path.normpath(os.path.join(base, os.path.expanduser(values[key])))
        for name, table in doc.get("sources", {}).items():
            kind, spec = _source_from_table(name, table, base)
            if kind == "spec":
                sources[name] = spec
            elif kind == "plugin":
                plugin_sources[name] = spec
            else:
                npz[name] = spec
        if "datasets" in doc:
            values["datasets"] = _datasets_from_table(doc["datasets"], base)
    data_home, download = overrides.pop("data_home", None), overrides.pop("download", None)
    if data_home is not None or download is not None:
        settings = values.get("datasets", DatasetSettings())
        values["datasets"] = dataclasses.replace(
            settings,
            home=os.path.abspath(os.path.expanduser(data_home)) if data_home else settings.home,
            download=settings.download if download is None else download,
        )
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("demo", True) and "demo" in {*sources, *npz, *plugin_sources}:
        raise ConfigError(
            "the source name 'demo' is the built-in demo data's; name yours otherwise, or start "
            "the server with --no-demo ([server] demo = false)"
        )
    return ServerConfig(sources=sources, npz=npz, plugin_sources=plugin_sources, **values)
