"""The flock backend: leases on one host, as flock()s on the lock files (lockd.lockfiles),
with fencing tokens from one durable counter (`tokens`)."""
