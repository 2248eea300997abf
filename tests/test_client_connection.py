"""The sans-I/O client connection: daemon frames in, requests and state out. No sockets."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lockd_client import errors, protocol
from lockd_client._connection import EOF_REASON, MAX_UNREAD_EVENTS, Connection, LeaseState, Phase

ENCODER = msgspec.msgpack.Encoder()
HOLDER = protocol.Holder(pid=42, uid=1000, command="rsync", token=7)


def frames(*messages: object) -> bytes:
    out = bytearray()
    for message in messages:
        protocol.encode_frame(ENCODER, message, out)
    return bytes(out)


def decoded(data: bytes) -> list[protocol.Request]:
    """The requests a daemon would read from `data`; every byte must belong to a frame."""
    buffer = protocol.FrameBuffer(protocol.MAX_REQUEST_FRAME)
    buffer.feed(data)
    decoder = protocol.request_decoder()
    requests = []
    while (body := buffer.next_frame()) is not None:
        requests.append(decoder.decode(body))
    assert buffer.pending == 0
    return requests


def welcome() -> protocol.Welcome:
    return protocol.Welcome(version=protocol.PROTOCOL_VERSION, server="lockd 0.1.0", backend="flock")


def opened(features: list[str] | None = None) -> Connection:
    conn = Connection()
    conn.hello()
    if features is None:
        features = [protocol.Feature.EVENTS]
    conn.receive_data(frames(protocol.Welcome(protocol.PROTOCOL_VERSION, "lockd 0.1.0", "flock", features=features)))
    assert conn.phase is Phase.OPEN
    return conn


def granted(conn: Connection, *names: str, tokens: list[int] | None = None):
    call, _ = conn.acquire(names)
    conn.receive_data(frames(protocol.Granted(call.id, tokens or list(range(1, len(names) + 1)))))
    return call.result()


def assert_broken(conn: Connection, *, because: str) -> None:
    assert conn.closed
    assert conn.close_reason is not None
    assert conn.close_reason.startswith("lockd broke the protocol")
    assert because in conn.close_reason


# --- handshake --------------------------------------------------------------------------------


def test_hello_is_the_first_frame_and_welcome_opens_the_connection():
    conn = Connection()
    call, data = conn.hello(label="backup job")
    assert decoded(data) == [protocol.Hello(protocol.PROTOCOL_VERSION, "backup job")]
    assert conn.phase is Phase.GREETING and not call.done
    conn.receive_data(frames(welcome()))
    assert call.result() == welcome()
    assert conn.server == welcome()
    assert conn.phase is Phase.OPEN


def test_hello_twice_is_refused_and_changes_nothing():
    conn = Connection()
    conn.hello()
    with pytest.raises(errors.LocalProtocolError, match="already started"):
        conn.hello()
    assert conn.phase is Phase.GREETING


def test_requests_before_welcome_are_refused_without_using_an_id():
    conn = Connection()
    with pytest.raises(errors.LocalProtocolError, match="before lockd's Welcome"):
        conn.acquire(["a"])
    conn.hello()
    with pytest.raises(errors.LocalProtocolError, match="before lockd's Welcome"):
        conn.status()
    conn.receive_data(frames(welcome()))
    call, data = conn.acquire(["a"])
    assert call.id == 1 and decoded(data)[0].id == 1


def test_version_refusal_fails_the_handshake_and_closes():
    conn = Connection()
    call, _ = conn.hello()
    conn.receive_data(frames(protocol.Error(None, protocol.ErrorCode.VERSION, "lockd speaks version 2 only")))
    with pytest.raises(errors.ProtocolError, match="version 2 only"):
        call.result()
    assert conn.closed and conn.server is None


def test_eof_during_handshake_fails_it():
    conn = Connection()
    call, _ = conn.hello()
    conn.receive_data(b"")
    with pytest.raises(errors.DaemonUnavailable, match="during the handshake"):
        call.result()


@pytest.mark.parametrize(
    "message", [protocol.Granted(1, [1]), protocol.Error(1, "busy", "held"), protocol.Done(1)]
)
def test_anything_but_welcome_during_handshake_is_a_violation(message):
    conn = Connection()
    call, _ = conn.hello()
    conn.receive_data(frames(message))
    assert_broken(conn, because="instead of welcome")
    with pytest.raises(errors.RemoteProtocolError):
        call.result()


def test_daemon_speaking_before_hello_is_a_violation():
    conn = Connection()
    conn.receive_data(frames(welcome()))
    assert_broken(conn, because="before Hello")


def test_second_welcome_is_a_violation():
    conn = opened()
    conn.receive_data(frames(welcome()))
    assert_broken(conn, because="second welcome")


# --- requests and ids -------------------------------------------------------------------------


def test_acquire_encodes_every_field_and_dedups_names():
    conn = opened()
    _, data = conn.acquire(["b", "a", "b"], shared=True, timeout=2.5, label="job", pid=99)
    assert decoded(data) == [protocol.Acquire(1, ["b", "a"], "shared", 2.5, "job", 99)]


@pytest.mark.parametrize("timeout", [None, 0, 2.5])
def test_no_wait_is_a_zero_timeout_whatever_the_timeout(timeout):
    conn = opened()
    _, data = conn.acquire(["a"], wait=False, timeout=timeout)
    assert decoded(data)[0].timeout == 0


def test_ids_increase_from_one_and_release_uses_none():
    conn = opened()
    lease = granted(conn, "a")
    assert lease.id == 1
    assert decoded(conn.release(lease)) == [protocol.Release(1)]
    ids = [conn.status([])[0].id, conn.release_pid(5, ["a"])[0].id, conn.force_release("a")[0].id]
    assert ids == [2, 3, 4]


@pytest.mark.parametrize(
    "move",
    [
        lambda c: c.acquire(["ok", "../etc/passwd"]),
        lambda c: c.acquire([]),
        lambda c: c.acquire([b"bytes"]),
        lambda c: c.acquire(["x" * 251]),
        lambda c: c.status(["-rf"]),
        lambda c: c.release_pid(1, [".hidden"]),
        lambda c: c.release_pid(1, []),
        lambda c: c.force_release(""),
    ],
)
def test_invalid_names_are_refused_locally_and_change_nothing(move):
    conn = opened()
    with pytest.raises(errors.InvalidName):
        move(conn)
    assert conn.acquire(["fine"])[0].id == 1


def test_a_label_over_the_cap_is_refused_before_sending():
    conn = Connection()
    with pytest.raises(errors.InvalidArgument, match="at most 256 characters"):
        conn.hello(label="x" * 257)
    assert conn.phase is Phase.NEW
    conn.hello(label="x" * 256)
    conn.receive_data(frames(welcome()))
    with pytest.raises(errors.InvalidArgument, match="shorten it"):
        conn.acquire(["a"], label="x" * 257)
    assert conn.acquire(["a"], label="x" * 256)[0].id == 1


def test_an_oversized_request_is_refused_before_sending():
    conn = opened()
    names = [f"{i:0>250}" for i in range(300)]
    with pytest.raises(errors.LimitExceeded, match="fewer locks"):
        conn.acquire(names)
    assert conn.acquire(["a"])[0].id == 1


def test_the_request_limit_is_the_one_the_daemon_advertises():
    conn = Connection()
    conn.hello()
    conn.receive_data(frames(protocol.Welcome(protocol.PROTOCOL_VERSION, "lockd", "flock", max_frame=2048)))
    names = [f"{i:0>250}" for i in range(9)]  # about 2.3 KB: over this daemon's limit only
    with pytest.raises(errors.LimitExceeded, match="limit of 2048 bytes"):
        conn.acquire(names)
    call, data = conn.acquire(names[:7])
    assert call.id == 1 and len(data) - protocol.PREFIX_SIZE <= 2048


def test_requests_encode_and_resolve_their_replies():
    conn = opened()
    status, data = conn.status(["a", "b"])
    assert decoded(data) == [protocol.Status(1, ["a", "b"])]
    by_pid, data = conn.release_pid(1234, ["a"])
    assert decoded(data) == [protocol.ReleasePid(2, 1234, ["a"])]
    forced, data = conn.force_release("a")
    assert decoded(data) == [protocol.ForceRelease(3, "a")]
    info = protocol.LockInfo("a", "exclusive", [HOLDER], [])
    conn.receive_data(frames(protocol.Done(3, 2), protocol.StatusReply(1, [info]), protocol.Done(2, 1)))
    assert status.result() == [info]
    assert by_pid.result() == 1
    assert forced.result() == 2


def test_result_before_the_reply_is_an_error():
    conn = opened()
    call, _ = conn.status()
    with pytest.raises(errors.LocalProtocolError, match="no reply yet"):
        call.result()


# --- routing ----------------------------------------------------------------------------------


def test_granted_makes_a_held_lease_with_a_token_per_name():
    conn = opened()
    call, _ = conn.acquire(["b", "a"])
    conn.receive_data(frames(protocol.Granted(call.id, [10, 20])))
    lease = call.result()
    assert lease.names == ("b", "a")
    assert lease.tokens == {"b": 10, "a": 20}
    assert lease.state is LeaseState.HELD


def test_replies_are_routed_by_id_in_any_order():
    conn = opened()
    first, _ = conn.acquire(["a"])
    second, _ = conn.acquire(["b"])
    conn.receive_data(frames(protocol.Granted(second.id, [5])))
    assert second.done and not first.done
    conn.receive_data(frames(protocol.Error(first.id, "busy", "a is held", [HOLDER])))
    with pytest.raises(errors.LockBusy) as busy:
        first.result()
    assert busy.value.holders == [HOLDER]
    assert second.result().tokens == {"b": 5}


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_slicing_of_the_stream_gives_the_same_outcome(cuts):
    conn = opened()
    a, _ = conn.acquire(["a"])
    s, _ = conn.status()
    stream = frames(
        protocol.Queued(a.id, [HOLDER]),
        protocol.StatusReply(s.id, []),
        protocol.Granted(a.id, [3]),
        protocol.Lost(a.id, "forced by root"),
    )
    at = 0
    for cut in sorted({c % len(stream) for c in cuts} | {len(stream)}):
        if cut > at:  # an empty chunk would mean EOF
            conn.receive_data(stream[at:cut])
            at = cut
    assert a.take_queued() == [[HOLDER]]
    assert s.result() == []
    assert a.result().state is LeaseState.LOST


def test_queued_notices_collect_until_taken():
    conn = opened()
    call, _ = conn.acquire(["a"])
    other = protocol.Holder(pid=7, uid=0)
    conn.receive_data(frames(protocol.Queued(call.id, [HOLDER]), protocol.Queued(call.id, [other])))
    assert not call.done
    assert call.take_queued() == [[HOLDER], [other]]
    assert call.take_queued() == []


def test_lost_marks_the_lease_with_its_reason_and_leaves_others():
    conn = opened()
    a = granted(conn, "a")
    b = granted(conn, "b")
    conn.receive_data(frames(protocol.Lost(a.id, "force-released by uid 0")))
    assert a.state is LeaseState.LOST and a.lost_reason == "force-released by uid 0"
    assert b.state is LeaseState.HELD
    # Releasing a lost lease tells the daemon, once, that it was let go of.
    assert conn.release(a) == frames(protocol.Release(a.id))
    assert conn.release(a) == b""
    assert a.state is LeaseState.LOST
    assert "force-released by uid 0" in str(a.lost_error())


@pytest.mark.parametrize(
    "message, because",
    [
        (lambda a, s: protocol.Lost(a, "x"), "never granted"),
        (lambda a, s: protocol.Queued(s, []), "queued for status"),
        (lambda a, s: protocol.Done(a), "done in reply to acquire"),
        (lambda a, s: protocol.Granted(s, [1]), "granted in reply to status"),
        (lambda a, s: protocol.Granted(a, [1, 2]), "2 tokens and 0 descriptors for 1 names"),
        (lambda a, s: protocol.Granted(s + 1, [1]), "never sent"),
        (lambda a, s: protocol.Done(0), "never sent"),
    ],
)
def test_replies_the_protocol_rules_out_break_the_connection(message, because):
    conn = opened()
    held = granted(conn, "held")
    a, _ = conn.acquire(["a"])
    s, _ = conn.status()
    conn.receive_data(frames(message(a.id, s.id)))
    assert_broken(conn, because=because)
    for call in (a, s):
        with pytest.raises(errors.RemoteProtocolError, match="check that lockd and this client are the same version"):
            call.result()
    assert held.state is LeaseState.LOST and because in held.lost_reason


@pytest.mark.parametrize(
    "message", [protocol.Granted(1, [9]), protocol.Queued(1, []), protocol.Error(1, "busy", "")]
)
def test_more_replies_for_a_granted_lease_break_the_connection(message):
    conn = opened()
    granted(conn, "a")
    conn.receive_data(frames(message))
    assert_broken(conn, because="already granted")


def test_a_violation_discards_the_rest_of_the_data():
    conn = opened()
    call, _ = conn.status()
    conn.receive_data(frames(protocol.Done(99), protocol.StatusReply(call.id, [])))
    with pytest.raises(errors.RemoteProtocolError):
        call.result()


# --- withdrawing and stale replies ------------------------------------------------------------


def test_withdrawing_a_waiting_acquire_sends_release_and_ignores_what_was_in_flight():
    conn = opened()
    call, _ = conn.acquire(["a"])
    assert decoded(conn.withdraw(call)) == [protocol.Release(call.id)]
    assert call.done
    conn.receive_data(
        frames(
            protocol.Queued(call.id, [HOLDER]),
            protocol.Granted(call.id, [1]),
            protocol.Error(call.id, "timeout", "gave up"),
        )
    )
    assert not conn.closed
    with pytest.raises(errors.LockdError, match="withdrawn"):
        call.result()
    assert conn.withdraw(call) == b""


def test_withdrawing_a_granted_acquire_releases_its_lease():
    conn = opened()
    call, _ = conn.acquire(["a"])
    conn.receive_data(frames(protocol.Granted(call.id, [1])))
    assert decoded(conn.withdraw(call)) == [protocol.Release(call.id)]
    assert call.result().state is LeaseState.RELEASED
    assert conn.withdraw(call) == b""


def test_withdrawing_a_failed_acquire_or_other_request_sends_nothing():
    conn = opened()
    failed, _ = conn.acquire(["a"], wait=False)
    conn.receive_data(frames(protocol.Error(failed.id, "busy", "held")))
    assert conn.withdraw(failed) == b""
    status, _ = conn.status()
    assert conn.withdraw(status) == b""
    conn.receive_data(frames(protocol.StatusReply(status.id, [])))
    assert not conn.closed


def test_withdrawing_the_handshake_closes_the_connection():
    conn = Connection()
    call, _ = conn.hello()
    assert conn.withdraw(call) == b""
    assert conn.closed and call.done


def test_lost_for_a_released_lease_is_ignored():
    conn = opened()
    lease = granted(conn, "a")
    conn.release(lease)
    conn.receive_data(frames(protocol.Lost(lease.id, "the backend lost it")))
    assert lease.state is LeaseState.RELEASED and not conn.closed


def test_release_is_idempotent_and_checks_the_owner():
    conn = opened()
    lease = granted(conn, "a")
    other = opened()
    with pytest.raises(errors.LocalProtocolError, match="another connection"):
        other.release(lease)
    with pytest.raises(errors.LocalProtocolError, match="another connection"):
        other.withdraw(conn.acquire(["b"])[0])
    assert lease.state is LeaseState.HELD
    assert decoded(conn.release(lease)) == [protocol.Release(lease.id)]
    assert conn.release(lease) == b""


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, cls",
    [
        ("busy", errors.LockBusy),
        ("timeout", errors.LockTimeout),
        ("invalid_name", errors.InvalidName),
        ("bad_lock_file", errors.BadLockFile),
        ("permission_denied", errors.PermissionDenied),
        ("not_held", errors.NotHeld),
        ("protocol", errors.LocalProtocolError),
        ("version", errors.ProtocolError),
        ("limit", errors.LimitExceeded),
        ("unavailable", errors.BackendUnavailable),
        ("a code from a newer daemon", errors.LockdError),
    ],
)
def test_error_replies_become_their_exception(code, cls):
    conn = opened()
    call, _ = conn.acquire(["a"])
    conn.receive_data(frames(protocol.Error(call.id, code, "what to do next", [HOLDER])))
    with pytest.raises(cls, match="what to do next") as raised:
        call.result()
    assert type(raised.value) is cls
    if issubclass(cls, errors.LockBusy):
        assert raised.value.holders == [HOLDER]
    assert not conn.closed


def test_a_connection_error_ends_everything_with_its_message():
    conn = opened()
    lease = granted(conn, "a")
    call, _ = conn.acquire(["b"])
    conn.receive_data(frames(protocol.Error(None, "shutdown", "lockd is shutting down")))
    assert lease.state is LeaseState.LOST and lease.lost_reason == "lockd is shutting down"
    with pytest.raises(errors.DaemonUnavailable, match="shutting down"):
        call.result()
    assert conn.closed


def test_names_of_a_lease_are_listed_with_commas_since_a_name_may_contain_plus():
    conn = opened()
    lease = granted(conn, "a+b", "c")
    assert "a+b, c" in repr(lease)
    conn.receive_data(frames(protocol.Lost(lease.id, "forcibly released")))
    assert str(lease.lost_error()).startswith("the lease on a+b, c was lost: forcibly released")


# --- end of the connection --------------------------------------------------------------------


def test_eof_loses_every_lease_and_fails_every_request():
    conn = opened()
    leases = [granted(conn, "a"), granted(conn, "b")]
    call, _ = conn.acquire(["c"])
    conn.receive_data(b"")
    assert [(x.state, x.lost_reason) for x in leases] == [(LeaseState.LOST, EOF_REASON)] * 2
    with pytest.raises(errors.DaemonUnavailable) as raised:
        call.result()
    assert type(raised.value) is errors.DaemonUnavailable  # gone, not a backend failure
    # The advice fits a program and a lockctl user alike: no "connect again".
    assert str(raised.value) == f"{EOF_REASON}; is lockd still running? If it is, its log says why"
    assert conn.release(leases[0]) == b""
    with pytest.raises(errors.DaemonUnavailable, match="connection to lockd is closed .* make a new one"):
        conn.status()


def test_data_after_the_end_is_discarded():
    conn = opened()
    conn.receive_data(b"")
    conn.receive_data(frames(protocol.Lost(1, "x"), welcome()))
    assert conn.close_reason == EOF_REASON


def test_close_releases_leases_rather_than_losing_them():
    conn = opened()
    lease = granted(conn, "a")
    call, _ = conn.status()
    conn.close()
    assert lease.state is LeaseState.RELEASED and lease.lost_reason is None
    with pytest.raises(errors.DaemonUnavailable, match="closed by this client"):
        call.result()
    conn.close()
    assert conn.closed


def test_abort_loses_leases_with_the_transport_reason():
    conn = opened()
    lease = granted(conn, "a")
    call, _ = conn.acquire(["b"])
    conn.abort("reading failed: connection reset")
    assert lease.lost_reason == "reading failed: connection reset"
    with pytest.raises(errors.DaemonUnavailable, match="connection reset; is lockd still running"):
        call.result()
    conn.abort("again")
    assert conn.close_reason == "reading failed: connection reset"


def test_an_oversized_reply_is_refused_from_its_prefix_alone():
    conn = opened()
    lease = granted(conn, "a")
    conn.receive_data((protocol.MAX_REPLY_FRAME + 1).to_bytes(4, "big"))
    assert_broken(conn, because="exceeds the limit")
    assert lease.state is LeaseState.LOST


def test_the_frames_before_an_oversized_prefix_are_applied_first():
    conn = opened()
    call, _ = conn.acquire(["a"])
    conn.receive_data(frames(protocol.Granted(call.id, [1])) + (protocol.MAX_REPLY_FRAME + 1).to_bytes(4, "big"))
    assert_broken(conn, because="exceeds the limit")
    lease = call.result()  # granted, then lost with the connection
    assert lease.state is LeaseState.LOST and "exceeds the limit" in (lease.lost_reason or "")


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never used in msgpack
        msgspec.msgpack.encode({"type": "granted", "id": "one", "tokens": []}),
        msgspec.msgpack.encode(protocol.Hello(1)),  # a request, not a reply
        msgspec.msgpack.encode([1, 2, 3]),
    ],
)
def test_garbage_breaks_the_connection(body):
    conn = opened()
    conn.receive_data(len(body).to_bytes(4, "big") + body)
    assert_broken(conn, because="")


# --- lock-file descriptors --------------------------------------------------------------------
# The connection only counts descriptors as numbers: these are made up, never opened.


def outliving() -> Connection:
    conn = Connection()
    conn.hello()
    conn.receive_data(frames(protocol.Welcome(protocol.PROTOCOL_VERSION, "lockd", "flock", leases_outlive_daemon=True)))
    return conn


def test_each_grant_claims_its_descriptors_in_the_order_they_came():
    conn = outliving()
    a, _ = conn.acquire(["a", "b"])
    c, _ = conn.acquire(["c"])
    # Descriptors come no later than the first byte of their grant (possibly with an earlier
    # reply's), so possibly before its last byte.
    data = frames(protocol.Granted(a.id, [1, 2], 2), protocol.Granted(c.id, [3], 1))
    conn.receive_data(data[:5], [101, 102])
    conn.receive_data(data[5:], [103])
    assert a.result().fds == [101, 102] and c.result().fds == [103]
    assert conn.stray_fds() == []


def test_an_interruption_between_frames_leaves_the_rest_applied_by_the_next_read(monkeypatch):
    conn = outliving()
    b, _ = conn.acquire(["b"])
    c, _ = conn.acquire(["c"])
    handle = conn._handle

    def interrupted_once(message: protocol.Reply) -> None:
        handle(message)
        monkeypatch.setattr(conn, "_handle", handle)
        raise KeyboardInterrupt  # as a signal may, right after the Queued is applied

    monkeypatch.setattr(conn, "_handle", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        conn.receive_data(frames(protocol.Queued(b.id, [HOLDER]), protocol.Granted(b.id, [1], 1)), [101])
    assert b.take_queued() == [[HOLDER]] and not b.done
    # What the blocking client does on its way out; b's grant, when applied, is then stray.
    assert decoded(conn.withdraw(b)) == [protocol.Release(b.id)]
    conn.receive_data(frames(protocol.Granted(c.id, [2], 1)), [102])
    assert c.result().fds == [102]
    assert conn.stray_fds() == [101]


def test_a_grant_whose_descriptors_did_not_come_breaks_the_connection_and_fails_the_call():
    conn = outliving()
    call, _ = conn.acquire(["a"])
    conn.receive_data(frames(protocol.Granted(call.id, [1], 1)))
    assert_broken(conn, because="1 descriptors, of which 0 came")
    with pytest.raises(errors.RemoteProtocolError):
        call.result()


def test_descriptors_of_a_grant_nobody_waits_for_are_handed_back_to_close():
    conn = outliving()
    call, _ = conn.acquire(["a"])
    conn.withdraw(call)
    conn.receive_data(frames(protocol.Granted(call.id, [1], 1)), [101])
    assert conn.stray_fds() == [101]
    assert conn.stray_fds() == []


def test_a_lease_tied_to_a_process_keeps_its_descriptors_only_when_asked():
    conn = outliving()
    call, _ = conn.acquire(["a"], pid=42)
    conn.receive_data(frames(protocol.Granted(call.id, [1], 1)), [101])
    assert call.result().fds == [] and conn.stray_fds() == [101]
    conn.keep_tied_descriptors = True
    call, _ = conn.acquire(["b"], pid=42)
    conn.receive_data(frames(protocol.Granted(call.id, [2], 1)), [102])
    assert call.result().fds == [102] and conn.stray_fds() == []


@pytest.mark.parametrize("outlive", [True, False])
def test_a_lease_with_descriptors_outlives_the_daemon_only_where_it_says_so(outlive: bool):
    conn = outliving() if outlive else opened()
    call, _ = conn.acquire(["a"])
    conn.receive_data(frames(protocol.Granted(call.id, [1], 1)), [101])
    lease = call.result()
    bare = granted(conn, "b")  # no descriptor: nothing of it outlives the connection
    conn.receive_data(b"")
    assert bare.state is LeaseState.LOST
    if outlive:
        assert lease.state is LeaseState.HELD and lease.detached
        assert conn.release(lease) == b""  # nobody to tell; the caller unlocks its descriptors
        assert lease.state is LeaseState.RELEASED
    else:
        assert lease.state is LeaseState.LOST and not lease.detached
    assert lease.fds == [101]  # the caller's to let go of, whatever happened


def test_closing_hands_back_every_lease_that_still_has_descriptors_lost_ones_too():
    conn = outliving()
    held, lost = conn.acquire(["a"])[0], conn.acquire(["b"])[0]
    conn.receive_data(frames(protocol.Granted(held.id, [1], 1), protocol.Granted(lost.id, [2], 1)), [101, 102])
    conn.receive_data(frames(protocol.Lost(lost.id, "forced")))
    ended = conn.close()
    assert sorted(fd for r in ended for fd in conn.let_go(r)) == [101, 102]
    assert conn.let_go(ended[0]) == []
    assert held.result().state is LeaseState.RELEASED and lost.result().state is LeaseState.LOST


def test_a_forked_child_forgets_every_descriptor_and_lease():
    conn = outliving()
    call, _ = conn.acquire(["a"])
    conn.receive_data(frames(protocol.Granted(call.id, [1], 1)), [101, 999])  # 999: for a grant to come
    lease = call.result()
    assert sorted(conn.abandon("forked")) == [101, 999]
    assert lease.state is LeaseState.LOST and lease.fds == [] and conn.closed


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_resolve_with_the_text_of_their_reply() -> None:
    conn = Connection()
    conn.hello()
    conn.receive_data(frames(msgspec.structs.replace(welcome(), features=[protocol.Feature.METRICS])))
    call, data = conn.metrics()
    assert decoded(data) == [protocol.Metrics(call.id)]
    conn.receive_data(frames(protocol.MetricsReply(call.id, "lockd_connections 1.0\n")))
    assert call.result() == "lockd_connections 1.0\n"


def test_metrics_from_a_daemon_that_does_not_serve_them_fail_before_anything_is_sent() -> None:
    conn = opened()  # its welcome lists no features, as an older daemon's
    with pytest.raises(errors.ProtocolError, match="does not serve metrics; upgrade it"):
        conn.metrics()
    call, _ = conn.status()
    assert call.id == 1, "no request id was used"


def test_a_metrics_reply_to_another_request_breaks_the_protocol() -> None:
    conn = opened()
    call, _ = conn.status()
    conn.receive_data(frames(protocol.MetricsReply(call.id, "")))
    assert_broken(conn, because="metrics_reply in reply to status")
# --- reexec -------------------------------------------------------------------------------------


def reexecuting() -> Connection:
    return opened(features=[protocol.Feature.REEXEC])


def test_reexec_resolves_with_the_new_programs_answer_and_keeps_everything_else() -> None:
    conn = reexecuting()
    lease = granted(conn, "a")
    call, data = conn.reexec()
    assert decoded(data) == [protocol.Reexec(call.id)]
    status, _ = conn.status()
    # Requests sent after it may be answered first: by the old program, or the new one.
    conn.receive_data(frames(protocol.StatusReply(status.id, [])))
    assert status.result() == [] and not call.done
    done = protocol.Reexecuted(call.id, previous="lockd 0.1.0", server="lockd 0.2.0", paused=0.042)
    conn.receive_data(frames(done))
    assert call.result() == done
    assert lease.state is LeaseState.HELD and not conn.closed
    assert conn.server is not None and conn.server.server == "lockd 0.1.0", "the welcome stays the old one's"


def test_reexec_of_a_daemon_that_cannot_fails_before_anything_is_sent() -> None:
    conn = opened()  # its welcome lists no reexec, as an older daemon's
    with pytest.raises(errors.ProtocolError, match=r"this lockd \(lockd 0.1.0\) cannot re-execute itself in place"):
        conn.reexec()
    call, _ = conn.status()
    assert call.id == 1, "no request id was used"


@pytest.mark.parametrize(
    ("code", "cls"),
    [("not_reexecuted", errors.NotReexecuted), ("permission_denied", errors.PermissionDenied)],
)
def test_a_refused_reexec_raises_its_error_and_the_connection_goes_on(code: str, cls: type[Exception]) -> None:
    conn = reexecuting()
    lease = granted(conn, "a")
    call, _ = conn.reexec()
    conn.receive_data(frames(protocol.Error(call.id, code, "not re-executed: the daemon is stopping")))
    with pytest.raises(cls, match="not re-executed: the daemon is stopping") as raised:
        call.result()
    assert type(raised.value) is cls
    assert lease.state is LeaseState.HELD and not conn.closed


def test_a_daemon_gone_during_the_reexec_fails_it_and_detaches_what_outlives_it() -> None:
    conn = Connection()
    conn.hello()
    conn.receive_data(frames(msgspec.structs.replace(
        welcome(), features=[protocol.Feature.REEXEC], leases_outlive_daemon=True,
    )))
    call, _ = conn.acquire(["a"])
    conn.receive_data(frames(protocol.Granted(call.id, [1], 1)), [101])
    lease = call.result()
    reexec, _ = conn.reexec()
    conn.receive_data(b"")
    with pytest.raises(errors.DaemonUnavailable, match=EOF_REASON):
        reexec.result()
    assert lease.state is LeaseState.HELD and lease.detached


@pytest.mark.parametrize(
    ("reply", "because"),
    [
        (lambda r, s: protocol.Reexecuted(s, "lockd 0.1.0", "lockd 0.2.0", 0.1), "reexecuted in reply to status"),
        (lambda r, s: protocol.Done(r), "done in reply to reexec"),
        (lambda r, s: protocol.Queued(r, []), "queued for reexec"),
    ],
)
def test_replies_a_reexec_cannot_get_break_the_connection(reply, because: str) -> None:
    conn = reexecuting()
    call, _ = conn.reexec()
    status, _ = conn.status()
    conn.receive_data(frames(reply(call.id, status.id)))
    assert_broken(conn, because=because)
    with pytest.raises(errors.RemoteProtocolError):
        call.result()


# --- subscriptions ----------------------------------------------------------------------------


def lease_event(name: str, kind: protocol.EventKind = "granted") -> protocol.LeaseEvent:
    return protocol.LeaseEvent(1000.0, kind, name, "exclusive", token=7, pid=42, uid=1000)


def subscribed(conn: Connection, *names: str):
    subscription, _ = conn.subscribe(names)
    conn.receive_data(frames(protocol.Done(subscription.id)))
    assert subscription.started
    return subscription


def test_a_subscription_starts_with_done_and_queues_its_events_in_order():
    conn = opened()
    lease = granted(conn, "mine")
    subscription, data = conn.subscribe(["a", "b", "a"])
    assert decoded(data) == [protocol.Subscribe(subscription.id, ["a", "b"])]
    assert not subscription.started
    conn.receive_data(frames(protocol.Done(subscription.id)))
    events = [lease_event("a"), lease_event("b", "released"), lease_event("a", "refused")]
    conn.receive_data(frames(*(protocol.Event(subscription.id, e) for e in events), protocol.Lost(lease.id, "x")))
    assert list(subscription.events) == events
    assert not subscription.ended and lease.state is LeaseState.LOST  # and the rest goes on


def test_unsubscribing_sends_release_once_and_ignores_what_was_in_flight():
    conn = opened()
    subscription = subscribed(conn)
    conn.receive_data(frames(protocol.Event(subscription.id, lease_event("a"))))
    assert decoded(conn.unsubscribe(subscription)) == [protocol.Release(subscription.id)]
    assert subscription.ended and subscription.error is None
    assert conn.unsubscribe(subscription) == b""
    conn.receive_data(frames(
        protocol.Event(subscription.id, lease_event("b")), protocol.Error(subscription.id, "limit", "dropped")
    ))
    assert not conn.closed
    assert [event.name for event in subscription.events] == ["a"]  # still readable
    assert subscription.error is None


def test_unsubscribing_before_done_withdraws_it():
    conn = opened()
    subscription, _ = conn.subscribe([])
    assert decoded(conn.unsubscribe(subscription)) == [protocol.Release(subscription.id)]
    conn.receive_data(frames(protocol.Done(subscription.id)))
    assert not conn.closed and not subscription.started


def test_an_older_daemon_is_told_apart_before_anything_is_sent():
    conn = opened(features=[protocol.Feature.SEMAPHORES])
    with pytest.raises(errors.ProtocolError, match=r"lockd \(lockd 0.1.0\) does not send lease events; upgrade it"):
        conn.subscribe(["a"])
    call, _ = conn.status()
    assert call.id == 1


def test_invalid_names_are_refused_before_anything_is_sent():
    conn = opened()
    with pytest.raises(errors.InvalidName):
        conn.subscribe(["ok", "../etc"])
    assert conn.status()[0].id == 1


@pytest.mark.parametrize(
    ("code", "cls"), [("limit", errors.SubscriptionDropped), ("invalid_name", errors.InvalidName)]
)
def test_an_error_ends_the_subscription_after_its_events(code, cls):
    conn = opened()
    subscription = subscribed(conn, "a")
    event, error = protocol.Event(subscription.id, lease_event("a")), protocol.Error(subscription.id, code, "why")
    conn.receive_data(frames(event, error))
    assert subscription.ended and isinstance(subscription.error, cls) and "why" in str(subscription.error)
    assert [event.name for event in subscription.events] == ["a"]
    assert conn.unsubscribe(subscription) == b""  # the daemon sends nothing more for it
    assert not conn.closed


def test_the_end_of_the_connection_ends_every_subscription():
    conn = opened()
    first, second = subscribed(conn, "a"), subscribed(conn, "b")
    conn.receive_data(b"")
    for subscription in (first, second):
        assert isinstance(subscription.error, errors.DaemonUnavailable)
        assert EOF_REASON in str(subscription.error)
    assert first.error is not second.error
    assert conn.unsubscribe(first) == b""


def test_a_subscription_refused_for_a_limit_is_no_drop():
    conn = opened()
    subscription, _ = conn.subscribe([])
    conn.receive_data(frames(protocol.Error(subscription.id, "limit", "too many subscriptions")))
    assert type(subscription.error) is errors.LimitExceeded


def test_closing_the_connection_ends_every_subscription_cleanly():
    conn = opened()
    subscription = subscribed(conn, "a")
    conn.receive_data(frames(protocol.Event(subscription.id, lease_event("a"))))
    conn.close()
    assert subscription.ended and subscription.error is None and len(subscription.events) == 1


def test_events_nobody_reads_end_the_subscription_here_as_the_daemon_would():
    conn = opened()
    subscription = subscribed(conn)
    flood = [protocol.Event(subscription.id, lease_event(f"n{i}")) for i in range(MAX_UNREAD_EVENTS + 5)]
    conn.receive_data(frames(*flood))
    assert isinstance(subscription.error, errors.SubscriptionDropped)
    assert len(subscription.events) == MAX_UNREAD_EVENTS
    assert subscription.events[-1].name == f"n{MAX_UNREAD_EVENTS - 1}"
    # The daemon is told with the next write, whoever makes it; what it sent meanwhile is dropped.
    assert conn.unsubscribe(subscription) == b""
    assert conn.has_unsent and decoded(conn.take_unsent()) == [protocol.Release(subscription.id)]
    assert not conn.has_unsent and conn.take_unsent() == b""
    conn.receive_data(frames(protocol.Event(subscription.id, lease_event("late"))))
    assert not conn.closed and subscription.events[-1].name == f"n{MAX_UNREAD_EVENTS - 1}"


@pytest.mark.parametrize(
    ("message", "because"),
    [
        (lambda s: protocol.Event(s, lease_event("a")), "event for subscription 1, not yet started"),
        (lambda s: protocol.Granted(s, [1]), "granted for subscription 1, not yet started"),
        (lambda s: protocol.StatusReply(s, []), "status_reply for subscription 1, not yet started"),
    ],
)
def test_what_a_subscription_cannot_get_breaks_the_connection(message, because):
    conn = opened()
    subscription, _ = conn.subscribe([])
    conn.receive_data(frames(message(subscription.id)))
    assert_broken(conn, because=because)
    assert isinstance(subscription.error, errors.RemoteProtocolError)


def test_a_second_done_breaks_the_connection():
    conn = opened()
    subscription = subscribed(conn)
    conn.receive_data(frames(protocol.Done(subscription.id)))
    assert_broken(conn, because="done for subscription 1, started")


def test_an_event_for_a_request_breaks_the_connection():
    conn = opened()
    call, _ = conn.status()
    conn.receive_data(frames(protocol.Event(call.id, lease_event("a"))))
    assert_broken(conn, because="event in reply to status")
