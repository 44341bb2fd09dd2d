"""Every deep_ep setting in one place: the Buffer's keyword arguments and the ``DEEP_EP_*`` environment.

This is the only module that reads ``os.environ``. A :class:`Settings` is resolved once, when a
``Buffer`` is made (:meth:`Settings.resolve`): an argument the caller passed wins, else its
environment variable, else the default. Everything below the Buffer reads its ``Settings``.

=================================  ==========================  ===========  ===============================================
variable                           Buffer argument             default      meaning
=================================  ==========================  ===========  ===============================================
``DEEP_EP_TIMEOUT_S``              ``timeout_s``               100          bound of every wait, seconds
``DEEP_EP_BUFFER_SIZE``            ``ep_buffer_size``          4 MiB        pipelining chunk of long transfers (``4M``...)
``DEEP_EP_COMPRESSION_LEVEL``      ``compression_level``       16           wire format of dispatched rows: 16, 8, 4, auto
``DEEP_EP_COMPRESSION_RATIO``      ``compression_ratio``       0.3          ``'auto'``'s byte target (of bf16's bytes)
``DEEP_EP_COMPRESSION_TOLERANCE``  ``compression_tolerance``   none         ``'auto'``'s per-row error bound instead
``DEEP_EP_COMPRESSION_STATS``      ``compression_stats``       0            ``buffer.last_dispatch_stats`` (a host sync)
``DEEP_EP_TOPOLOGY_AWARE``         ``topology_aware``          1            ``'auto'`` picks hierarchical across hosts
``DEEP_EP_RANKS_PER_NODE``         ``ranks_per_node``          hostnames    ranks per node (emulates nodes on one host)
``DEEP_EP_CHECK``                  (none)                      0            on CUDA, cached dispatch and combine exchange
                                                                            metadata too (always on CPU)
``DEEP_EP_DISABLE_TRITON``         (none)                      0            use the torch twins instead of Triton kernels
``DEEP_EP_NVLINK_PATH``            (none)                      host         nvlink fresh-dispatch path: ``host`` (counts
                                                                            read by a metadata exchange) or ``fused`` (one
                                                                            notify kernel, one data kernel)
``DEEP_EP_NVLINK_CHUNKS``          (none)                      1            nvlink host path: chunks of a one-round call
``DEEP_EP_NVLINK_PULL``            (none)                      copy         nvlink host path: ``copy`` or ``gather`` reads
``DEEP_EP_NVLINK_DISPATCH``        (none)                      pull         nvlink host path: ``pull`` or ``push`` dispatch
``DEEP_EP_NVLINK_PUSH_CHUNKS``     (none)                      2            nvlink push dispatch: chunks
``DEEP_EP_NVLINK_EMULATE``         (none)                      0            nvlink on CPU ranks, emulated with shared
                                                                            memory (tests)
``DEEP_EP_KERNELS_ON_CPU``         (none)                      0            with ``TRITON_INTERPRET=1``: the Triton
                                                                            kernels run (interpreted) on CPU tensors
=================================  ==========================  ===========  ===============================================

Test-only: ``DEEP_EP_TEST_SHARE_GPU`` (``tests/conftest.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Union

from .errors import DeepEPInputError

__all__ = [
    "Settings",
    "VARIABLES",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_EP_BUFFER_SIZE",
    "env_raw",
    "env_key",
    "env_values",
    "env_int",
    "env_float",
    "env_bool",
    "env_choice",
    "triton_disabled",
    "kernels_on_cpu",
]

#: Default bound of every wait, in seconds (``DEEP_EP_TIMEOUT_S`` overrides).
DEFAULT_TIMEOUT_S = 100.0
#: Default pipelining chunk of long transfers, in bytes (``DEEP_EP_BUFFER_SIZE`` overrides).
DEFAULT_EP_BUFFER_SIZE = 4 * 1024 * 1024

#: every environment variable deep_ep reads (the module docstring's table explains each)
VARIABLES = (
    "DEEP_EP_TIMEOUT_S",
    "DEEP_EP_BUFFER_SIZE",
    "DEEP_EP_COMPRESSION_LEVEL",
    "DEEP_EP_COMPRESSION_RATIO",
    "DEEP_EP_COMPRESSION_TOLERANCE",
    "DEEP_EP_COMPRESSION_STATS",
    "DEEP_EP_TOPOLOGY_AWARE",
    "DEEP_EP_RANKS_PER_NODE",
    "DEEP_EP_CHECK",
    "DEEP_EP_DISABLE_TRITON",
    "DEEP_EP_NVLINK_PATH",
    "DEEP_EP_NVLINK_CHUNKS",
    "DEEP_EP_NVLINK_PULL",
    "DEEP_EP_NVLINK_DISPATCH",
    "DEEP_EP_NVLINK_PUSH_CHUNKS",
    "DEEP_EP_NVLINK_EMULATE",
    "DEEP_EP_KERNELS_ON_CPU",
)


def env_raw(name: str) -> Optional[str]:
    """The raw value of environment variable ``name`` (``None`` when unset or empty).

    Args:
        name: the variable's name (a ``DEEP_EP_*`` one, or a launcher's such as ``WORLD_SIZE``).

    Returns:
        The string, or ``None``.
    """
    if _ENV_DATA is not None:  # os.environ's own dict (what os.environ.get reads, without its key encoding)
        key = _ENV_KEYS.get(name)
        if key is None:
            key = _ENV_KEYS[name] = os.environ.encodekey(name)
        b = _ENV_DATA.get(key)
        raw = os.environ.decodevalue(b) if b is not None else None
    else:  # pragma: no cover - another Python's os.environ
        raw = os.environ.get(name)
    return raw if raw not in (None, "") else None


def env_key(names: Any) -> Any:
    """A key of :func:`env_values` for the variables ``names`` (a tuple of names), made once by its caller."""
    if _ENV_DATA is not None:
        return tuple(os.environ.encodekey(n) for n in names)
    return tuple(names)  # pragma: no cover - another Python's os.environ


def env_values(key: Any) -> tuple:
    """The undecoded values (``bytes`` or ``None``) of the variables of ``key`` (:func:`env_key`), in a
    fraction of a microsecond: for caches keyed by settings read at every call.

    Args:
        key: from :func:`env_key`.

    Returns:
        One value per variable.
    """
    if _ENV_DATA is not None:
        return tuple(map(_ENV_DATA.get, key))
    return tuple(map(os.environ.get, key))  # pragma: no cover - another Python's os.environ


#: ``os.environ``'s mapping and encoded keys: settings read at every call cost a dict lookup, not an
#: encode (os.environ.get costs about a microsecond); writes through os.environ land in the same mapping
_ENV_DATA = getattr(os.environ, "_data", None)
if not (hasattr(os.environ, "encodekey") and hasattr(os.environ, "decodevalue")):  # pragma: no cover
    _ENV_DATA = None
_ENV_KEYS: dict = {}


def env_float(name: str, default: Optional[float]) -> Optional[float]:
    """A float setting from the environment (``default`` when unset); junk raises ``DeepEPInputError``."""
    raw = env_raw(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise DeepEPInputError(f"environment variable {name}={raw!r} is not a number") from None


def env_int(name: str, default: Optional[int]) -> Optional[int]:
    """An int setting from the environment; sizes may end in K/M/G (KiB, MiB, GiB; ``KB`` etc. too)."""
    raw = env_raw(name)
    if raw is None:
        return default
    text = raw.strip().upper()
    mult = 1
    for suffix, m in (
        ("KIB", 1 << 10),
        ("MIB", 1 << 20),
        ("GIB", 1 << 30),
        ("KB", 1 << 10),
        ("MB", 1 << 20),
        ("GB", 1 << 30),
        ("K", 1 << 10),
        ("M", 1 << 20),
        ("G", 1 << 30),
    ):
        if text.endswith(suffix):
            text, mult = text[: -len(suffix)], m
            break
    try:
        return int(float(text) * mult)
    except ValueError:
        raise DeepEPInputError(f"environment variable {name}={raw!r} is not an integer or a size") from None


def env_bool(name: str, default: bool) -> bool:
    """A boolean setting (1/0, true/false, yes/no, on/off) from the environment."""
    raw = env_raw(name)
    if raw is None:
        return default
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise DeepEPInputError(f"environment variable {name}={raw!r} is not a boolean (1/0, true/false, on/off)")


def env_choice(name: str, default: str, choices: tuple) -> str:
    """A setting from the environment that must be one of ``choices``."""
    raw = env_raw(name)
    if raw is None:
        return default
    v = raw.strip().lower()
    if v not in choices:
        raise DeepEPInputError(f"{name} must be one of {', '.join(choices)}; got {raw!r}")
    return v


def _positive_int(name: str, default: int) -> int:
    v = env_int(name, default)
    if v is None or v < 1:
        raise DeepEPInputError(f"{name} must be an int >= 1, got {env_raw(name)!r}")
    return v


def kernels_on_cpu() -> bool:
    """``DEEP_EP_KERNELS_ON_CPU`` with ``TRITON_INTERPRET=1``: the Triton kernels run (under the interpreter)
    on CPU tensors too (read at every call; tests of the emulated nvlink transport set it)."""
    interp = env_raw("TRITON_INTERPRET")
    return env_bool("DEEP_EP_KERNELS_ON_CPU", False) and interp is not None and interp != "0"


def triton_disabled() -> bool:
    """``DEEP_EP_DISABLE_TRITON``: the torch twins run instead of the Triton kernels (read at every call,
    so tests can flip it)."""
    raw = env_raw("DEEP_EP_DISABLE_TRITON")
    return raw is not None and raw != "0"


Level = Union[int, str]


@dataclass(frozen=True)
class Settings:
    """A Buffer's settings, resolved once (see the module docstring for each field's variable).

    Attributes:
        timeout_s: bound of every host wait, seconds (> 0).
        ep_buffer_size: pipelining chunk of long transfers, bytes (> 0).
        compression_level: raw ``compression_level`` (parsed by :class:`deep_ep.wire.Wire`).
        compression_ratio: ``'auto'``'s byte target, or ``None``.
        compression_tolerance: ``'auto'``'s error bound, or ``None``.
        combine_compression_level: 16 or 8 (raw; parsed by the Wire).
        compression_stats: record ``last_dispatch_stats``.
        topology_aware: ``'auto'`` picks the hierarchical transport across hosts.
        ranks_per_node: ranks per node, or ``None`` (from the hostnames).
        check_every_call: cached dispatch and combine also exchange metadata (``DEEP_EP_CHECK``; ``None``:
            the Buffer's default, off on CUDA, on for CPU ranks but the emulated nvlink's fused path).
        nvlink_path: ``'host'`` or ``'fused'`` (the nvlink transport's fresh-dispatch path).
        nvlink_chunks, nvlink_pull, nvlink_dispatch, nvlink_push_chunks: the nvlink host path's tuning.
        nvlink_emulate: allow the nvlink transport on CPU ranks (shared-memory emulation, for tests).
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    ep_buffer_size: int = DEFAULT_EP_BUFFER_SIZE
    compression_level: Any = 16
    compression_ratio: Optional[float] = None
    compression_tolerance: Optional[float] = None
    combine_compression_level: Any = 16
    compression_stats: bool = False
    topology_aware: bool = True
    ranks_per_node: Optional[int] = None
    check_every_call: Optional[bool] = None
    nvlink_path: str = "host"
    nvlink_chunks: int = 1
    nvlink_pull: str = "copy"
    nvlink_dispatch: str = "pull"
    nvlink_push_chunks: int = 2
    nvlink_emulate: bool = False

    @classmethod
    def resolve(
        cls,
        *,
        timeout_s: Optional[float] = None,
        ep_buffer_size: Optional[int] = None,
        compression_level: Any = None,
        compression_ratio: Optional[float] = None,
        compression_tolerance: Optional[float] = None,
        combine_compression_level: Any = 16,
        compression_stats: Optional[bool] = None,
        topology_aware: Optional[bool] = None,
        ranks_per_node: Optional[int] = None,
    ) -> "Settings":
        """The settings of a Buffer: each argument the caller gave (not ``None``), else its environment
        variable, else the default.

        Args:
            timeout_s, ep_buffer_size, compression_level, compression_ratio, compression_tolerance,
            combine_compression_level, compression_stats, topology_aware, ranks_per_node: the Buffer's
            keyword arguments of the same names (``None`` = not given).

        Returns:
            A frozen :class:`Settings`.

        Raises:
            DeepEPInputError: a value (argument or variable) is out of range or unparsable.
        """
        t = float(timeout_s) if timeout_s is not None else env_float("DEEP_EP_TIMEOUT_S", DEFAULT_TIMEOUT_S)
        if not t > 0:
            raise DeepEPInputError(f"timeout_s must be positive, got {t}")
        size = int(ep_buffer_size) if ep_buffer_size is not None else env_int("DEEP_EP_BUFFER_SIZE", None)
        size = DEFAULT_EP_BUFFER_SIZE if size is None else size
        if size <= 0:
            raise DeepEPInputError(f"ep_buffer_size must be positive, got {size}")
        level = compression_level
        env_level = env_raw("DEEP_EP_COMPRESSION_LEVEL")
        if env_level is not None and (level is None or str(level).strip() == "16"):
            level = env_level
        tol = compression_tolerance
        if tol is None and compression_ratio is None and str(level).strip().lower() == "auto":
            tol = env_float("DEEP_EP_COMPRESSION_TOLERANCE", None)
        stats = (
            bool(compression_stats) if compression_stats is not None else env_bool("DEEP_EP_COMPRESSION_STATS", False)
        )
        topo = bool(topology_aware) if topology_aware is not None else env_bool("DEEP_EP_TOPOLOGY_AWARE", True)
        rpn = ranks_per_node if ranks_per_node is not None else env_int("DEEP_EP_RANKS_PER_NODE", None)
        if rpn is not None and (isinstance(rpn, bool) or not isinstance(rpn, int) or rpn < 1):
            raise DeepEPInputError(f"ranks_per_node must be an int >= 1, got {rpn!r}")
        return cls(
            timeout_s=t,
            ep_buffer_size=size,
            compression_level=16 if level is None else level,
            compression_ratio=compression_ratio,
            compression_tolerance=tol,
            combine_compression_level=combine_compression_level,
            compression_stats=stats,
            topology_aware=topo,
            ranks_per_node=rpn,
            check_every_call=None if env_raw("DEEP_EP_CHECK") is None else env_bool("DEEP_EP_CHECK", False),
            nvlink_path=env_choice("DEEP_EP_NVLINK_PATH", "host", ("host", "fused")),
            nvlink_chunks=_positive_int("DEEP_EP_NVLINK_CHUNKS", 1),
            nvlink_pull=env_choice("DEEP_EP_NVLINK_PULL", "copy", ("copy", "gather")),
            nvlink_dispatch=env_choice("DEEP_EP_NVLINK_DISPATCH", "pull", ("pull", "push")),
            nvlink_push_chunks=_positive_int("DEEP_EP_NVLINK_PUSH_CHUNKS", 2),
            nvlink_emulate=env_bool("DEEP_EP_NVLINK_EMULATE", False),
        )

    def with_(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied (names must be fields)."""
        names = {f.name for f in fields(self)}
        bad = set(changes) - names
        if bad:
            raise TypeError(f"unknown settings {sorted(bad)}")
        return replace(self, **changes)

    @classmethod
    def default_compression_ratio(cls) -> float:
        """``'auto'``'s byte target when none is given: ``DEEP_EP_COMPRESSION_RATIO`` or 0.3."""
        v = env_float("DEEP_EP_COMPRESSION_RATIO", 0.3)
        return 0.3 if v is None else v
