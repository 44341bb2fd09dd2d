"""The fused path's memory protocol: word indices shared by its kernels (:mod:`deep_ep.kernels.fused`) and the
host side (:mod:`deep_ep.transport.nvlink.fused`, :class:`deep_ep.Buffer`). Plain ints: importing this module
imports no Triton."""

from __future__ import annotations

__all__ = [
    "CTL_EPOCH",
    "CTL_SENT",
    "CTL_DONE",
    "CTL_ERROR",
    "CTL_NOTIFY",
    "CTL_GIVE_UP",
    "OUT_DONE",
    "OUT_STATUS",
    "OUT_MISSING",
    "OUT_NRECV",
    "OUT_VERDICT",
    "OUT_HEADERS",
    "VERDICTS",
]

#: control words (a rank's own memory, never written by peers): the epoch of its last fused kernel, the
#: counters of a launch's sending programs, of its finished programs, the missing-rank mask of a wait that
#: gave up, the counter of a notify's channel programs
CTL_EPOCH, CTL_SENT, CTL_DONE, CTL_ERROR, CTL_NOTIFY = 0, 1, 2, 3, 4
#: under the interpreter, a host watchdog stores a nonzero value here to make waits give up (no clock)
CTL_GIVE_UP = 8
#: the host's pinned block of a notify (int64 words): its ticket (written last), whether a wait gave up, the
#: missing ranks, the received count, the verdict, then every rank's header, the counts matrix, the id
#: ranges and the received count per local expert
OUT_DONE, OUT_STATUS, OUT_MISSING, OUT_NRECV, OUT_VERDICT, OUT_HEADERS = 0, 1, 2, 3, 4, 8
#: verdict words: ranks disagree (header or a rank's own error), a rank receives more than its
#: num_worst_tokens, a rank's ids lie outside [-1, E), a rank receives more rows than the area holds
VERDICTS = 4
