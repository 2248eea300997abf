"""lockd's benchmark suite: lockd against the floors a user could pick instead.

Invariant: nothing here is imported by the daemon, the client or the tests; the suite drives
them only as users do (a daemon process, the client library, lockctl, the wire protocol).
Run `bench/run --help`; docs/performance.md has the command and the latest figures.
"""
