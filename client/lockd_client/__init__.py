"""Client library for the lockd lock broker.

Invariant: importing this package never imports trio, so command-line tools start fast; the
trio client is `lockd_client.trio_client`, imported explicitly.

    import lockd_client
    with lockd_client.connect() as client, client.lock("backup") as lease:
        ...  # "backup" is held; lease.token fences writes made under it
"""

__version__ = "0.1.0"

from . import protocol
from .blocking import Client, Events, Lease, connect
from .errors import (
    BackendUnavailable,
    BadLockFile,
    DaemonBusy,
    DaemonUnavailable,
    InvalidArgument,
    InvalidName,
    LeaseLost,
    LimitExceeded,
    LocalProtocolError,
    LockBusy,
    LockdError,
    LockTimeout,
    NotHeld,
    PermissionDenied,
    ProtocolError,
    RemoteProtocolError,
    SubscriptionDropped,
    WouldDeadlock,
)

__all__ = [
    "BadLockFile",
    "Client",
    "BackendUnavailable",
    "DaemonBusy",
    "DaemonUnavailable",
    "Events",
    "InvalidArgument",
    "InvalidName",
    "Lease",
    "LeaseLost",
    "LimitExceeded",
    "LocalProtocolError",
    "LockBusy",
    "LockTimeout",
    "LockdError",
    "NotHeld",
    "PermissionDenied",
    "ProtocolError",
    "RemoteProtocolError",
    "SubscriptionDropped",
    "WouldDeadlock",
    "connect",
    "protocol",
    "__version__",
]
