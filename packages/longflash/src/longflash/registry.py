"""The backend registry: discovery through entry points, selection, explanations.

Backends are found lazily, on the first call that needs them, from the entry-point group
``longflash.backends``. Loading a backend that fails (missing package, import error,
version mismatch) turns it into an unavailable backend with a reason; it never breaks
``import longflash``. Selection is cheap on the normal path (each candidate's ``check``
returns an empty list); explanations are built only when nothing fits or on request.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

from longflash.call import AttentionCall
from longflash.errors import UnsupportedError

log = logging.getLogger("longflash")

ENTRY_POINT_GROUP = "longflash.backends"

# First-party backends: listed even when their package is missing, with the pip command.
KNOWN_PACKAGES = {
    "cuda": ("longflash-cuda", "cuda"),
    "triton": ("longflash-triton", "triton"),
    "pallas": ("longflash-jax", "jax"),
}

# "auto" tries backends by descending priority; a backend may set its own `priority`.
DEFAULT_PRIORITY = 0


@runtime_checkable
class Backend(Protocol):
    name: str
    frameworks: frozenset[str]

    def available(self) -> tuple[bool, str]: ...

    def check(self, call: AttentionCall) -> list[str]: ...

    def forward(self, call: AttentionCall, q: Any, k: Any, v: Any) -> tuple[Any, Any]: ...

    def backward(
        self, call: AttentionCall, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any
    ) -> tuple[Any, Any, Any]: ...


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str
    frameworks: frozenset[str]
    devices: frozenset[str]
    priority: int = DEFAULT_PRIORITY


class _Unavailable:
    """Stands in for a backend that could not be loaded."""

    def __init__(self, name: str, reason: str, frameworks: frozenset[str] = frozenset()):
        self.name = name
        self.frameworks = frameworks
        self.devices: frozenset[str] = frozenset()
        self.priority = -(10**9)
        self._reason = reason

    def available(self) -> tuple[bool, str]:
        return False, self._reason

    def check(self, call: AttentionCall) -> list[str]:
        return [self._reason]

    def forward(self, call, q, k, v):  # pragma: no cover - never selected
        raise UnsupportedError(f"backend {self.name!r} is unavailable: {self._reason}")

    backward = forward


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backends: dict[str, Any] | None = None
        self._available: dict[str, tuple[bool, str]] = {}

    # -- discovery --------------------------------------------------------------------
    def _discover(self) -> dict[str, Any]:
        if self._backends is not None:
            return self._backends
        with self._lock:
            if self._backends is not None:
                return self._backends
            found: dict[str, Any] = {}
            from longflash import reference

            found["reference"] = reference.backend
            try:
                eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
            except Exception as exc:  # pragma: no cover - broken metadata
                log.warning("could not read entry points %s: %s", ENTRY_POINT_GROUP, exc)
                eps = ()
            for ep in [*eps, *_env_entry_points()]:
                if ep.name == "reference" or ep.name in found:
                    continue
                found[ep.name] = ep  # loaded lazily
            for name, (dist, extra) in KNOWN_PACKAGES.items():
                if name not in found:
                    found[name] = _Unavailable(
                        name,
                        f"package {dist} is not installed: pip install 'longflash[{extra}]'",
                    )
            self._backends = found
            return found

    def _load(self, name: str) -> Any:
        backends = self._discover()
        obj = backends[name]
        if isinstance(obj, metadata.EntryPoint):
            try:
                target = obj.load()
                backend = target() if callable(target) and not _is_backend(target) else target
                if not _is_backend(backend):
                    raise TypeError(
                        f"entry point {obj.value} gave {type(backend).__name__}, which does "
                        "not implement the Backend protocol"
                    )
                if backend.name != name:
                    raise ValueError(f"entry point {name!r} gave a backend named {backend.name!r}")
            except Exception as exc:
                log.debug("backend %s failed to load", name, exc_info=True)
                backend = _Unavailable(name, f"failed to load {obj.value}: {exc!r}")
            backends[name] = backend
            obj = backend
        return obj

    def register(self, backend: Any, *, replace: bool = False) -> None:
        """Register a backend object directly (tests, notebooks). Entry points are the
        way for packages."""
        if not _is_backend(backend):
            raise TypeError(f"{backend!r} does not implement the Backend protocol")
        backends = self._discover()
        if (
            backend.name in backends
            and not replace
            and not isinstance(backends[backend.name], (_Unavailable, metadata.EntryPoint))
        ):
            raise ValueError(f"a backend named {backend.name!r} is already registered")
        backends[backend.name] = backend
        self._available.pop(backend.name, None)

    def unregister(self, name: str) -> None:
        self._discover().pop(name, None)
        self._available.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._discover())

    def get(self, name: str) -> Any:
        if name not in self._discover():
            raise ValueError(
                f"unknown backend {name!r}; registered backends: {', '.join(self.names())} "
                "(or 'auto')"
            )
        return self._load(name)

    def available(self, name: str) -> tuple[bool, str]:
        cached = self._available.get(name)
        if cached is None:
            backend = self.get(name)
            try:
                cached = backend.available()
            except Exception as exc:
                cached = (False, f"available() raised {exc!r}")
            self._available[name] = cached
        return cached

    def info(self) -> list[BackendInfo]:
        out = []
        for name in self.names():
            b = self.get(name)
            ok, reason = self.available(name)
            out.append(
                BackendInfo(
                    name=name,
                    available=ok,
                    reason=reason,
                    frameworks=frozenset(getattr(b, "frameworks", frozenset())),
                    devices=frozenset(getattr(b, "devices", frozenset())),
                    priority=getattr(b, "priority", DEFAULT_PRIORITY),
                )
            )
        return out

    # -- selection --------------------------------------------------------------------
    def _auto_order(self, framework: str) -> list[Any]:
        cands = []
        for name in self.names():
            b = self._load(name)
            if framework not in getattr(b, "frameworks", ()):
                continue
            if not self.available(name)[0]:
                continue
            cands.append(b)
        cands.sort(key=lambda b: -getattr(b, "priority", DEFAULT_PRIORITY))
        return cands

    def reasons(self, backend: Any, call: AttentionCall) -> list[str]:
        ok, why = self.available(backend.name)
        if not ok:
            return [why]
        reasons = []
        if call.framework not in getattr(backend, "frameworks", ()):
            reasons.append(
                f"{call.framework} front-end not supported (supports: "
                f"{', '.join(sorted(backend.frameworks)) or 'none'})"
            )
        return reasons + list(backend.check(call))

    def select(self, call: AttentionCall, requested: str | None) -> Any:
        name = requested if requested is not None else get_backend()
        if name == "auto":
            for b in self._auto_order(call.framework):
                if not b.check(call):
                    return b
            raise UnsupportedError(
                "no backend can run this call:\n" + self.explain(call), self._all_reasons(call)
            )
        backend = self.get(name)
        reasons = self.reasons(backend, call)
        if reasons:
            raise UnsupportedError(
                f"backend {name!r} cannot run this call: " + "; ".join(reasons),
                {name: reasons},
            )
        return backend

    def _all_reasons(self, call: AttentionCall) -> dict[str, list[str]]:
        return {name: self.reasons(self.get(name), call) for name in self.names()}

    def explain(self, call: AttentionCall) -> str:
        lines = []
        chosen = None
        for b in self._auto_order(call.framework):
            if not b.check(call):
                chosen = b.name
                break
        for name, reasons in self._all_reasons(call).items():
            if reasons:
                lines.append(f"  {name}: declines: " + "; ".join(reasons))
            else:
                tag = "  <- auto picks this" if name == chosen else ""
                # Optional hook: a backend with several code paths says which one runs.
                describe = getattr(self.get(name), "describe", None)
                detail = f" [{describe(call)}]" if callable(describe) else ""
                lines.append(f"  {name}: accepts{detail}{tag}")
        return "\n".join(lines)


def _env_entry_points() -> list[metadata.EntryPoint]:
    """Backends named in LONGFLASH_BACKENDS="name=module:attr,..." — for source trees that are
    on sys.path but not pip-installed (no entry-point metadata), e.g. on a build machine."""
    spec = os.environ.get("LONGFLASH_BACKENDS", "")
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        if not sep or ":" not in value:
            log.warning("ignoring LONGFLASH_BACKENDS entry %r (expected name=module:attr)", item)
            continue
        out.append(metadata.EntryPoint(name.strip(), value.strip(), ENTRY_POINT_GROUP))
    return out


def _is_backend(obj: Any) -> bool:
    return all(
        hasattr(obj, attr)
        for attr in ("name", "frameworks", "available", "check", "forward", "backward")
    )


REGISTRY = Registry()

# -- the user's choice: global default plus a per-thread/per-context override ----------
_global_choice = "auto"
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "longflash_backend", default=None
)


def _validate_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != "auto":
        REGISTRY.get(name)  # raises ValueError listing the registered names
    return name


def set_backend(name: str) -> None:
    """Choose the backend for every later call: "auto" or a registered name."""
    global _global_choice
    _global_choice = _validate_name(name)


def get_backend() -> str:
    """The backend in force here: the innermost use_backend, else set_backend's."""
    ctx = _context_choice.get()
    return ctx if ctx is not None else _global_choice


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use ``name`` inside the block, in this thread/context only."""
    token = _context_choice.set(_validate_name(name))
    try:
        yield
    finally:
        _context_choice.reset(token)


def backends() -> list[BackendInfo]:
    """Every registered backend with whether it is available and, if not, why."""
    return REGISTRY.info()
