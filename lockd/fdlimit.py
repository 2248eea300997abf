"""The open-file limit: every connection and every held flock costs lockd one descriptor.

Invariant: `raise_nofile_limit` only ever raises the soft limit, up to the hard limit (and to
the kernel's per-process ceiling when the hard limit is unlimited); it never lowers it and
never needs privilege. `out_of_descriptors` is the one wording of the error a request gets
when they run out.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Final

from lockd_client.errors import LimitExceeded

_NR_OPEN: Final = Path("/proc/sys/fs/nr_open")


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE as far as allowed; return the soft limit now in force.

    The default soft limit (often 1024) would cap lockd at about a thousand leases, while the
    hard limit is what the administrator granted (LimitNOFILE= in the unit).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        # setrlimit refuses more than fs.nr_open descriptors, even for an unlimited hard limit.
        target = int(_NR_OPEN.read_text())
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def out_of_descriptors(err: OSError, outcome: str = "") -> LimitExceeded:
    """The error a request gets when the daemon has no descriptor left for it (EMFILE, ENFILE):
    what came of the request (`outcome`), why, and what to do about it."""
    what = f"{outcome}: " if outcome else ""
    return LimitExceeded(
        f"{what}the daemon is out of file descriptors ({err.strerror}); retry later, and raise its "
        "open-file limit (LimitNOFILE=) or end some leases"
    )
