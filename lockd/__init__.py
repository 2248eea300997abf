"""lockd: a lock broker for Linux hosts. The daemon side; the wire lives in lockd_client."""

__version__ = "0.1.0"
