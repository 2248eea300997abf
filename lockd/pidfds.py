"""The processes behind process-tied leases, through pidfds: opening one for a pid, waiting
for the process to exit, closing it.

Invariant: the pidfd is opened before the process's uid is read, and the process is checked
to be still running afterwards, so the uid an owner carries is that of the process its pidfd
watches, even if the pid is recycled meanwhile.
"""

from __future__ import annotations

import errno
import os
import select

import trio
from lockd_client import errors

from . import procinfo
from .fdlimit import out_of_descriptors
from .processes import ProcessOwner


def open_process(pid: int) -> ProcessOwner:
    """An owner for running process `pid`, with its pidfd open. Raises NotHeld for a process
    that does not exist (or a thread), LimitExceeded when out of descriptors."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise _open_error(pid, exc) from None
    uid = procinfo.process_uid(pid)
    # The pid may have been recycled between pidfd_open and reading /proc: the pidfd still
    # watches the old process, which then has exited (its pidfd is readable). poll, not
    # select: select refuses descriptors >= 1024, which a busy daemon has.
    ready = select.poll()
    ready.register(pidfd, select.POLLIN)
    if uid is None or ready.poll(0):
        os.close(pidfd)
        raise errors.NotHeld(f"process {pid} does not exist; a lease can only be tied to a running process")
    return ProcessOwner(pid, uid, procinfo.command_line(pid), pidfd)


async def exited(owner: ProcessOwner) -> bool:
    """Wait for `owner`'s process to exit: True then, False if its pidfd was closed first
    (`close`). Cancellation: stops waiting."""
    if owner.closed:
        return False  # closed before this task ran: its pidfd number may belong to another file
    try:
        await trio.lowlevel.wait_readable(owner.pidfd)
    except trio.ClosedResourceError:
        return False
    return not owner.closed


def close(owner: ProcessOwner) -> None:
    """Close `owner`'s pidfd, waking its `exited` with False."""
    trio.lowlevel.notify_closing(owner.pidfd)
    os.close(owner.pidfd)


def _open_error(pid: int, exc: OSError) -> errors.LockdError:
    if exc.errno == errno.ESRCH:
        return errors.NotHeld(f"process {pid} does not exist; a lease can only be tied to a running process")
    if exc.errno in (errno.ENOENT, errno.EINVAL):
        return errors.NotHeld(
            f"{pid} is a thread, not a process; tie the lease to its process (the thread group leader)"
        )
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return out_of_descriptors(exc, f"cannot watch process {pid}")
    return errors.DaemonUnavailable(f"cannot watch process {pid}: {exc.strerror}; retry later")
