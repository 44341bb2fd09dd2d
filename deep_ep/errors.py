"""Exceptions raised by deep_ep.

Every error deep_ep raises on purpose derives from :class:`DeepEPError`, so a
caller can catch them in one place. Errors about a caller's arguments also
derive from :class:`ValueError` / :class:`TypeError`, as Python users expect.
"""

from __future__ import annotations


class DeepEPError(RuntimeError):
    """Base class of the errors deep_ep raises on purpose."""


class DeepEPInputError(DeepEPError, ValueError):
    """A call's arguments are invalid (dtype, shape, range, ...)."""


class DeepEPTypeError(DeepEPError, TypeError):
    """A call's argument has the wrong type or dtype."""


class RankMismatchError(DeepEPError, ValueError):
    """Ranks of a group called a collective operation with arguments that disagree.

    Raised on every rank of the group, naming the ranks that disagree.
    """


class RemoteInputError(DeepEPError, ValueError):
    """Another rank of the group rejected its own input of a collective call.

    Raised on the ranks whose input was fine, so that no rank is left waiting.
    """


class DeepEPTimeoutError(DeepEPError, TimeoutError):
    """A wait exceeded ``timeout_s``; the message names the ranks that did not arrive.

    After this error the Buffer (and usually its process group) is unusable:
    collectives may be left half done on other ranks.
    """


class BufferDestroyedError(DeepEPError):
    """The Buffer was destroyed (or broken by an earlier timeout) and cannot be used."""


class PeerFailureError(DeepEPError):
    """The process group failed under a call: a peer process exited, or its connection broke.

    The message names the call and the ranks that did not answer a short diagnosis (the likely failed
    peers). The Buffer is unusable afterwards; so, usually, is the process group.
    """
