"""Fuzzing the wire: the decoders and framing with hypothesis, then a live daemon with random,
truncated, oversize and mutated frames from many connections at once.

A live run ends by checking that the daemon is the same process, answers a normal client
promptly, holds no lease and no descriptor more than before, and logged no internal error.
"""

from __future__ import annotations

import math
import os
import random

import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from lockd_client import protocol
from lockd_client.protocol import Acquire, ForceRelease, FrameBuffer, FrameTooLarge, Hello, Release, ReleasePid, Status

from .conftest import Daemon
from .rawclient import RawClient
from .waiting import wait_until_async

# --- the decoders and framing ---------------------------------------------------------------

NAMES = st.one_of(
    st.sampled_from(["a", "db", "x.y", "A-1@h+z", "", ".", "..", "../x", "a/b", "a\0b", "a\nb", "é", "x" * 251]),
    st.text(max_size=20),
)
INTS = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, -1, 2**31, 2**32, 2**63 - 1]))
FLOATS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-9]))
REQUESTS = st.one_of(
    st.builds(Hello, version=INTS, label=st.one_of(st.none(), st.text(max_size=10))),
    st.builds(
        Acquire, id=INTS, names=st.lists(NAMES, max_size=5), mode=st.sampled_from(["exclusive", "shared"]),
        timeout=FLOATS, label=st.one_of(st.none(), st.text(max_size=10)), pid=st.one_of(st.none(), INTS),
    ),
    st.builds(Release, id=INTS),
    st.builds(ReleasePid, id=INTS, pid=INTS, names=st.lists(NAMES, max_size=3)),
    st.builds(ForceRelease, id=INTS, name=NAMES),
    st.builds(Status, id=INTS, names=st.lists(NAMES, max_size=3)),
)
REQUEST_KINDS = (Hello, Acquire, Release, ReleasePid, ForceRelease, Status)
ENCODER = msgspec.msgpack.Encoder()


#: What a decoder may raise for a malformed body. msgspec raises UnicodeDecodeError, not a
#: DecodeError, for a string that is not UTF-8 (msgspec issue 714), so every reader of frames
#: must catch both.
MALFORMED = (msgspec.DecodeError, UnicodeDecodeError)


def decodes_or_rejects(decoder: msgspec.msgpack.Decoder, body: bytes, kinds: tuple[type, ...]) -> None:
    """A body decodes to one of `kinds` or raises one of MALFORMED: never anything else."""
    try:
        message = decoder.decode(body)
    except MALFORMED:
        return
    assert isinstance(message, kinds), message


@given(st.binary(max_size=256))
def test_decoders_take_any_bytes(body: bytes) -> None:
    decodes_or_rejects(protocol.request_decoder(), body, REQUEST_KINDS)
    decodes_or_rejects(protocol.reply_decoder(), body, protocol.Reply.__args__)


@given(REQUESTS, st.data())
def test_mutated_requests_decode_or_are_rejected(request, data) -> None:
    body = bytearray(ENCODER.encode(request))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(body) - 1))
        action = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if action == "flip":
            body[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set":
            body[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del body[at:]
            if not body:
                break
        else:
            body[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    decodes_or_rejects(protocol.request_decoder(), bytes(body), REQUEST_KINDS)


@given(st.lists(REQUESTS, min_size=1, max_size=8), st.lists(st.integers(1, 50), min_size=1))
def test_any_slicing_of_a_stream_yields_the_same_requests(requests, cuts) -> None:
    stream = bytearray()
    for request in requests:
        protocol.encode_frame(ENCODER, request, stream)
    frames = FrameBuffer(protocol.MAX_REQUEST_FRAME)
    decoder = protocol.request_decoder()
    got = []
    at = 0
    for size in cuts * (len(stream) // sum(cuts) + 1):
        frames.feed(stream[at:at + size])
        at += size
        while (body := frames.next_frame()) is not None:
            got.append(decoder.decode(body))
        if at >= len(stream):
            break
    assert frames.pending == 0
    assert len(got) == len(requests)
    for sent, received in zip(requests, got, strict=True):
        assert _same(sent, received)


def _same(a: object, b: object) -> bool:
    # NaN timeouts survive the trip but are not equal to themselves.
    return msgspec.msgpack.encode(a) == msgspec.msgpack.encode(b) or (
        type(a) is type(b) and isinstance(a, Acquire) and math.isnan(a.timeout or 0.0)
    )


@given(st.integers(protocol.MAX_REQUEST_FRAME + 1, 2**32 - 1), st.binary(max_size=64))
def test_an_oversize_prefix_is_refused_before_any_body_is_kept(size: int, tail: bytes) -> None:
    frames = FrameBuffer(protocol.MAX_REQUEST_FRAME)
    frames.feed(size.to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge) as info:
        frames.next_frame()
    assert info.value.size == size and info.value.limit == protocol.MAX_REQUEST_FRAME
    frames.feed(tail)
    with pytest.raises(FrameTooLarge):
        frames.next_frame()


# --- a live daemon ------------------------------------------------------------------------------

CONNECTIONS = 48
FRAMES_PER_CONNECTION = 120
POOL = ["f1", "f2", "f3", "f4"]


def weird_request(rng: random.Random, next_id: int, sleeper: int) -> object:
    """A well-formed request with hostile or extreme values. `sleeper` is a live process that
    exits soon: leases tied to it must end with it."""
    ids = [next_id, next_id, 0, -1, 2**63 - 1, -(2**63)]
    pids = [None, None, None, None, 0, -1, 2**31, 2**63 - 1, 4_194_305, sleeper]
    names = POOL + ["", "../x", "a/b", ".x", "a\0b", "a\nb", "x" * 251, "é"]
    timeouts = [None, 0, 0, 0.01, 0.2, -1.0, math.nan, math.inf, 1e308]
    pick = rng.random()
    rid = rng.choice(ids)
    if pick < 0.45:
        return Acquire(
            rid, rng.sample(names, rng.randint(0, 3)), rng.choice(["exclusive", "shared"]),
            rng.choice(timeouts), rng.choice([None, "fuzz", "x" * 300]), rng.choice(pids),
        )
    if pick < 0.65:
        return Release(rid)
    if pick < 0.75:
        return Status(rid, rng.sample(names, rng.randint(0, 2)))
    if pick < 0.87:
        return ForceRelease(rid, rng.choice(names))
    if pick < 0.99:
        return ReleasePid(rid, rng.choice([p for p in pids if p is not None]), rng.sample(names, rng.randint(0, 2)))
    return Hello(rng.choice([protocol.PROTOCOL_VERSION, 0, 99]))


def mangle(rng: random.Random, frame: bytearray) -> bytes:
    """One frame with its body or length prefix damaged. Most damage ends the connection."""
    pick = rng.random()
    body = frame[protocol.PREFIX_SIZE:]
    if pick < 0.3 and body:
        for _ in range(rng.randint(1, 3)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        return len(body).to_bytes(4, "big") + body
    if pick < 0.8:
        return rng.randbytes(rng.randint(1, 64))  # raw garbage
    if pick < 0.87:
        return rng.randint(1, 2**16).to_bytes(4, "big") + body  # length prefix disagrees
    if pick < 0.93:
        return rng.randint(protocol.MAX_REQUEST_FRAME + 1, 2**32 - 1).to_bytes(4, "big") + body
    if pick < 0.97:
        return b"\0\0\0\0"  # empty frame
    return bytes(frame[: rng.randrange(1, len(frame))])  # truncated: the rest never comes


async def fuzz_connection(path: str, rng: random.Random, sleeper: int, counts: dict[str, int]) -> None:
    """Send a burst of frames (most of a session hello'd first), read what comes back, hang up.

    A frame is damaged with a probability drawn per connection, from never to half the time:
    the daemon must both serve long runs of odd requests and survive early garbage.
    """
    encoder = msgspec.msgpack.Encoder()
    try:
        stream = await trio.open_unix_socket(path)
    except OSError:
        counts["refused"] += 1
        return
    async with stream:
        out = bytearray()
        if rng.random() < 0.9:
            protocol.encode_frame(encoder, Hello(protocol.PROTOCOL_VERSION, label="fuzz"), out)
        damage = rng.choice([0.0, 0.0, 0.01, 0.05, 0.5])
        for i in range(FRAMES_PER_CONNECTION):
            frame = bytearray()
            protocol.encode_frame(encoder, weird_request(rng, i + 1, sleeper), frame)
            out += mangle(rng, frame) if rng.random() < damage else frame
            counts["frames"] += 1
        try:
            # In a few slices, so the daemon sees frames split at random points.
            while out:
                cut = rng.randint(1, len(out))
                await stream.send_all(out[:cut])
                del out[:cut]
                if rng.random() < 0.1:
                    await trio.lowlevel.checkpoint()
            with trio.move_on_after(rng.choice([0.0, 0.2, 0.5])):
                while await stream.receive_some(65536):
                    counts["replies_read"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            counts["cut_off"] += 1


def daemon_fds(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def fd_targets(daemon: Daemon) -> list[str]:
    assert daemon.proc is not None
    where = f"/proc/{daemon.proc.pid}/fd"
    return sorted(os.readlink(f"{where}/{fd}") for fd in os.listdir(where))


def leases(daemon: Daemon) -> list[protocol.LockInfo]:
    with RawClient(daemon.socket) as c:
        reply = c.request(Status(1))
    assert isinstance(reply, protocol.StatusReply), reply
    return reply.locks


async def test_live_daemon_survives_fuzzing_from_many_connections(daemon: Daemon) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    baseline = daemon_fds(daemon)
    baseline_targets = fd_targets(daemon)
    counts = dict.fromkeys(["frames", "replies_read", "cut_off", "refused"], 0)
    sleeper = await trio.lowlevel.open_process(["sleep", "2"])
    with trio.fail_after(60):
        for wave in range(2):
            async with trio.open_nursery() as nursery:
                for n in range(CONNECTIONS):
                    rng = random.Random(wave * 1000 + n)
                    nursery.start_soon(fuzz_connection, daemon.socket, rng, sleeper.pid, counts)
        print(f"fuzz: {counts['frames']} frames over {2 * CONNECTIONS} connections; {counts}")
        await sleeper.wait()

        assert daemon.proc.poll() is None and daemon.proc.pid == pid
        await wait_until_async(
            lambda: not leases(daemon), "every fuzzing connection's leases ended", interval=0.02,
            show=lambda: leases(daemon),
        )
        await wait_until_async(
            lambda: daemon_fds(daemon) <= baseline, f"descriptors back to {baseline_targets}", interval=0.02,
            show=lambda: fd_targets(daemon),
        )
    with RawClient(daemon.socket, timeout=5) as c:
        granted = c.acquire("f1")
        assert isinstance(granted, protocol.Granted), granted
        c.send(Release(1))
        reply = c.request(Status(2))
    assert isinstance(reply, protocol.StatusReply) and reply.locks == []
    assert counts["refused"] == 0
    problems = internal_errors(daemon)
    assert not problems, "the daemon logged internal errors:\n" + "\n".join(problems)


def internal_errors(daemon: Daemon) -> list[str]:
    """Each distinct exception the daemon logged with a traceback, as "Type in function"."""
    found: dict[str, None] = {}
    lines = daemon.log().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = i + 1
            while end < len(lines) and lines[end].startswith(" "):
                end += 1
            frames = [frame for frame in lines[i:end] if frame.strip().startswith("File ")]
            function = frames[-1].rsplit(" in ", 1)[-1] if frames else "?"
            error = lines[end].split(":")[0] if end < len(lines) else "?"
            found[f"{error} in {function}"] = None
    return list(found)


async def test_invalid_utf8_is_refused_as_malformed(daemon: Daemon) -> None:
    body = bytearray(ENCODER.encode(Status(1, ["ab"])))
    body[body.index(b"ab")] = 0xFF
    with RawClient(daemon.socket) as c:
        c.sock.sendall(len(body).to_bytes(4, "big") + body)
        reply = c.recv()
        assert isinstance(reply, protocol.Error) and reply.code == "protocol", reply
        assert "malformed" in reply.message
        with pytest.raises(EOFError):
            c.recv()
    assert "UnicodeDecodeError in _read" not in internal_errors(daemon)


async def test_pids_no_process_can_have_are_refused_and_the_connection_goes_on(daemon: Daemon) -> None:
    with RawClient(daemon.socket) as c:
        for n, pid in enumerate([0, -1, 2**31, 2**63 - 1], 1):
            reply = c.request(Acquire(n, ["p"], pid=pid))
            assert isinstance(reply, protocol.Error) and reply.code == "protocol", (pid, reply)
        assert isinstance(c.acquire("p"), protocol.Granted)
    assert internal_errors(daemon) == []
