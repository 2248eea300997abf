"""The etcd backend: leases shared by every host on one etcd cluster (docs/etcd.md).

`backend` is the Backend; `client` speaks etcd's v3 JSON gateway over `http` and `pool`;
`mirror` is the watched copy of lockd's keys that orders requests by etcd's revisions.
"""
