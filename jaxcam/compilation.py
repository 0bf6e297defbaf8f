"""Compile once per machine, not once per process: JAX's persistent compilation cache.

Every new process pays XLA compilation again for every program it runs
(``jaxcam explain`` of one image: seconds of compiling for a fraction of a
second of computing). :func:`enable_compilation_cache` makes later processes
load the compiled executables from disk instead. The ``jaxcam`` command and
every ``python -m experiments.*`` turn it on by default; a notebook calls it
once::

    import jaxcam
    jaxcam.enable_compilation_cache()      # ~/.cache/jaxcam/xla (XDG_CACHE_HOME)

Where (first that applies): the ``path`` argument (the ``--compilation-cache
DIR|off`` option); the ``JAXCAM_COMPILATION_CACHE`` environment variable
(a directory, or ``off``); JAX's own ``jax_compilation_cache_dir``
(``JAX_COMPILATION_CACHE_DIR``) if the user set one; else
``$XDG_CACHE_HOME/jaxcam/xla``, default ``~/.cache/jaxcam/xla``. Never the
working directory.

How entries are stored, and why: JAX's own file cache writes an entry with a
plain ``write_bytes`` (without a size limit it takes no lock), so a process
reading while another writes, or a process killed mid-write, sees a truncated
entry, which JAX then reports in a warning per program and never rewrites.
jaxcam plugs its own store into JAX's cache (the same keys, the same
serialized executables, one file per entry): each entry is written to a
temporary file in the cache directory and renamed into place (atomic on POSIX
and Windows), and carries its length and CRC-32, checked on every read. So
concurrent processes see either no entry or a complete one, and a damaged
entry (truncated, overwritten) is deleted and compiled again, then rewritten.
A cache directory that cannot be created or written degrades to reading what
is there (or to compiling), a damaged entry to compiling: one
:class:`CompilationCacheWarning` per process, never an exception.

Entries are executables: like JAX's, the cache is trusted. It is created
private to the user (mode 0700); do not share it with users you do not trust.

Also here: :class:`CompileCounter`, which counts what JAX compiles (tests,
benchmarks).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import struct
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENV_VAR = "JAXCAM_COMPILATION_CACHE"
OFF_VALUES = frozenset({"off", "none", "no", "false", "0"})
ENTRY_SUFFIX = ".jaxcam-xla"
# magic, format version, payload length, CRC-32 of the payload
_HEADER = struct.Struct("<4sBQI")
_MAGIC = b"JXCC"
_VERSION = 1
_STALE_TEMP_SECONDS = 3600.0

# directory: in use now; configured: the last directory jaxcam put in JAX's config (so
# that it is not later mistaken for one the user set)
_state: dict[str, Any] = {"directory": None, "configured": None}
_lock = threading.Lock()


class CompilationCacheWarning(UserWarning):
    """The compilation cache could not be used as asked; jaxcam compiles instead."""


def _warn(message: str) -> None:
    # One line: the warning is about the cache, not about a line of the caller's code
    # (inside JAX's compile path there is none to show), so no source line is attached.
    warnings.warn_explicit(message, CompilationCacheWarning, filename="jaxcam", lineno=0,
                           module="jaxcam.compilation")


# --------------------------------------------------------------------------- where


def default_cache_dir() -> Path | None:
    """``$XDG_CACHE_HOME/jaxcam/xla``, else ``~/.cache/jaxcam/xla``; None without a home.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG base directory
    specification requires.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "jaxcam" / "xla"
    home = Path("~").expanduser()
    if not home.is_absolute():  # no HOME and no password entry: never fall back to cwd
        return None
    return home / ".cache" / "jaxcam" / "xla"


def _is_off(value: str | os.PathLike) -> bool:
    return isinstance(value, str) and value.strip().lower() in OFF_VALUES


def resolve_cache_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The cache directory the rules in the module docstring choose; None means off."""
    if path is not None:
        return None if _is_off(path) else Path(path).expanduser().absolute()
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return None if _is_off(env) else Path(env).expanduser().absolute()
    import jax

    users = jax.config.jax_compilation_cache_dir
    if users and users != _state["configured"]:
        return Path(users).expanduser().absolute()
    return default_cache_dir()


# --------------------------------------------------------------------------- the store


def _entry_bytes(value: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, _VERSION, len(value), zlib.crc32(value)) + value


def _entry_value(data: bytes) -> bytes | None:
    """The payload of an entry file, None if the file is damaged."""
    if len(data) < _HEADER.size:
        return None
    magic, version, length, crc = _HEADER.unpack_from(data)
    value = data[_HEADER.size:]
    if magic != _MAGIC or version != _VERSION or len(value) != length:
        return None
    if zlib.crc32(value) != crc:
        return None
    return value


def _store_class() -> type:
    """:class:`_AtomicFileStore` on JAX's cache interface (private in JAX; checked)."""
    from jax._src.compilation_cache_interface import CacheInterface

    class _AtomicFileStore(CacheInterface):
        """JAX compilation-cache entries as files, written atomically, checked on read."""

        def __init__(self, directory: Path, writable: bool) -> None:
            self._path = directory
            self.writable = writable
            self.warned = False
            self.damaged = 0

        def _warn_once(self, message: str) -> None:
            if not self.warned:
                self.warned = True
                _warn(message + "; further cache problems in this process are not reported")

        def _file(self, key: str) -> Path:
            return self._path / f"{key}{ENTRY_SUFFIX}"

        def get(self, key: str) -> bytes | None:
            path = self._file(key)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as err:
                self._warn_once(f"cannot read the compilation cache entry {path} ({err}); "
                                "compiling instead")
                return None
            value = _entry_value(data)
            if value is None:
                self.damaged += 1
                with contextlib.suppress(OSError):
                    path.unlink()  # compiled again and rewritten by put()
                self._warn_once(f"damaged compilation cache entry {path} removed; compiling "
                                "instead (the cache heals as programs are compiled again)")
            return value

        def put(self, key: str, value: bytes) -> None:
            if not self.writable:
                return
            path = self._file(key)
            if path.exists():
                return
            tmp = None
            try:
                fd, tmp = tempfile.mkstemp(dir=self._path, prefix=f".{key[:40]}-",
                                           suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    f.write(_entry_bytes(value))
                os.replace(tmp, path)  # readers see no entry or a complete one
                tmp = None
            except OSError as err:
                self.writable = False
                self._warn_once(f"cannot write to the compilation cache {self._path} ({err}); "
                                "new programs are compiled but not cached")
            finally:
                if tmp is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)

    return _AtomicFileStore


def _prepare_directory(directory: Path) -> bool | None:
    """Create ``directory`` (mode 0700); True if writable, False if only readable,
    None (with a warning) if it cannot be used at all."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        _warn(f"cannot create the compilation cache directory {directory} ({err}); compiling "
              f"without a cache (set {ENV_VAR}=DIR or --compilation-cache DIR to move it, "
              "or 'off')")
        return None
    if not directory.is_dir():
        _warn(f"the compilation cache path {directory} is not a directory; compiling without "
              f"a cache (set {ENV_VAR}=DIR or --compilation-cache DIR to move it, or 'off')")
        return None
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if not os.access(directory, os.R_OK | os.X_OK):
            _warn(f"cannot read the compilation cache directory {directory} ({err}); "
                  f"compiling without a cache (set {ENV_VAR}=DIR to move it, or 'off')")
            return None
        _warn(f"the compilation cache directory {directory} is read-only ({err}); reusing "
              "its entries, compiling and not caching the others "
              f"(set {ENV_VAR}=DIR to move it, or 'off')")
        return False
    _remove_stale_temporaries(directory)
    return True


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary files of writers that were killed mid-write (older than an hour)."""
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > _STALE_TEMP_SECONDS:
                        os.unlink(entry.path)


def _configure_jax(directory: Path | None) -> None:
    import jax

    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    _state["configured"] = str(directory)
    # cache every program: jaxcam's are many and small on a CPU (JAX's default only
    # keeps programs that took >= 1 s to compile)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _install_store(directory: Path, writable: bool) -> Any | None:
    """Put jaxcam's store in place of JAX's file cache; None if JAX's internals moved."""
    try:
        from jax._src import compilation_cache as jax_cache

        store = _store_class()(directory, writable)
        jax_cache.reset_cache()
        with jax_cache._cache_initialized_mutex:
            jax_cache._cache = store
            jax_cache._cache_initialized = True
    except (ImportError, AttributeError):
        return None  # JAX's own file cache (same directory, its own file names) is used
    return store


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on the persistent compilation cache for this process; returns its directory.

    Args:
      path: the cache directory, or ``"off"`` to turn the cache off; None
        follows ``JAXCAM_COMPILATION_CACHE``, then JAX's own setting, then
        ``$XDG_CACHE_HOME/jaxcam/xla`` (default ``~/.cache/jaxcam/xla``).

    Returns the directory in use, or None when the cache is off or cannot be
    used (then one :class:`CompilationCacheWarning` says why, and everything
    is compiled as without a cache). Programs compiled before the call are not
    written to the cache; call it before the first ``jaxcam.explain``. Safe to
    call again (a new directory replaces the old).
    """
    with _lock:
        directory = resolve_cache_dir(path)
        if directory is None:
            asked_off = _is_off(path) if path is not None else _is_off(
                os.environ.get(ENV_VAR, "").strip())
            if not asked_off:
                _warn("no home directory to put the compilation cache in; compiling without "
                      f"a cache (set {ENV_VAR}=DIR)")
            _disable()
            return None
        writable = _prepare_directory(directory)
        if writable is None:
            _disable()
            return None
        _configure_jax(directory)
        _state["store"] = _install_store(directory, writable)
        _state["directory"] = directory
        return directory


def _disable() -> None:
    _configure_jax(None)  # JAX's own cache (JAX_COMPILATION_CACHE_DIR) is off too
    with contextlib.suppress(ImportError, AttributeError):
        from jax._src import compilation_cache as jax_cache

        jax_cache.reset_cache()
    _state["directory"] = None
    _state["store"] = None


def disable_compilation_cache() -> None:
    """Turn the persistent compilation cache off for this process (JAX's too)."""
    with _lock:
        _disable()


def compilation_cache_dir() -> Path | None:
    """The directory :func:`enable_compilation_cache` put in use, or None."""
    return _state["directory"]


# --------------------------------------------------------------------------- command lines


def add_compilation_cache_option(parser: argparse.ArgumentParser) -> None:
    """``--compilation-cache DIR|off`` on a command line (the CLI and the experiments)."""
    default = default_cache_dir()
    parser.add_argument(
        "--compilation-cache", metavar="DIR|off", default=argparse.SUPPRESS,
        help=f"persistent XLA compilation cache: a directory, or 'off' (default: "
             f"${ENV_VAR} if set, else {default if default else '~/.cache/jaxcam/xla'}); "
             "later runs load compiled programs instead of compiling them again",
    )


def enable_from_args(args: argparse.Namespace) -> Path | None:
    """:func:`enable_compilation_cache` with the ``--compilation-cache`` value, if given."""
    return enable_compilation_cache(getattr(args, "compilation_cache", None))


def enable_from_argv(argv: Sequence[str] | None = None) -> Path | None:
    """:func:`enable_compilation_cache` with the ``--compilation-cache`` value in ``argv``
    (default ``sys.argv[1:]``), for scripts whose parser only lists the option."""
    parser = argparse.ArgumentParser(add_help=False)
    add_compilation_cache_option(parser)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    return enable_from_args(known)


# --------------------------------------------------------------------------- counting


class CompileCounter:
    """Count what JAX compiles while active, from JAX's own ``jax.monitoring`` events.

    JAX records ``/jax/core/compile/jaxpr_trace_duration`` once per jaxpr trace
    and ``/jax/core/compile/backend_compile_duration`` once per executable it
    builds, whether by XLA compilation or by loading it from the persistent
    cache (then ``/jax/compilation_cache/cache_hits`` precedes it). A call
    served from JAX's in-memory caches records neither.

    Attributes:
      compiles: executables built (compiled or loaded from the persistent cache).
      cache_hits: of those, loaded from the persistent cache.
      xla_compiles: of those, actually compiled by XLA (``compiles - cache_hits``).
      traces: jaxpr traces.
      compile_seconds, trace_seconds: JAX's durations, summed.
      programs: ``(name, seconds, from_cache)`` per executable, in order.
    """

    TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
    COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
    CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

    def __init__(self) -> None:
        self.compiles = 0
        self.cache_hits = 0
        self.traces = 0
        self.compile_seconds = 0.0
        self.trace_seconds = 0.0
        self.programs: list[tuple[str, float, bool]] = []
        self._hit_pending = False

    @property
    def xla_compiles(self) -> int:
        return self.compiles - self.cache_hits

    def _duration(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == self.COMPILE_EVENT:
            self.compiles += 1
            self.compile_seconds += duration_secs
            name = str(kwargs.get("fun_name", "?"))
            self.programs.append((name, float(duration_secs), self._hit_pending))
            self._hit_pending = False
        elif event == self.TRACE_EVENT:
            self.traces += 1
            self.trace_seconds += duration_secs

    def _event(self, event: str, **kwargs: Any) -> None:
        if event == self.CACHE_HIT_EVENT:
            self.cache_hits += 1
            self._hit_pending = True

    def __enter__(self) -> CompileCounter:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc: Any) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)
