"""The pure parts of the wire module: name and label rules, framing, decoders. No sockets."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest
from lockd_client import errors, protocol


@pytest.mark.parametrize("names", [["a"], ["a", "b.c", "x@y+z-1_2"], ["9" * 250]])
def test_names_problem_accepts_valid_names(names: list[str]) -> None:
    assert protocol.names_problem(names) is None


def test_names_problem_wants_at_least_one_name() -> None:
    assert "at least one lock" in protocol.names_problem([])


@pytest.mark.parametrize("bad", ["", ".hidden", "-rf", "a/b", "x" * 251, "é", b"bytes"])
def test_names_problem_names_the_first_invalid_name_and_the_rule(bad) -> None:
    problem = protocol.names_problem(["fine", bad, "also.bad/"])
    assert problem == protocol.name_problem(bad)
    assert repr(bad) in problem or type(bad).__name__ in problem


@pytest.mark.parametrize(
    "request_",
    [
        protocol.Hello(protocol.PROTOCOL_VERSION, label="l" * 257),
        protocol.Acquire(1, ["a"], label="é" * 257),
    ],
)
def test_a_label_over_the_cap_fails_decoding(request_) -> None:
    decoder = protocol.request_decoder()
    with pytest.raises(msgspec.ValidationError, match="length <= 256"):
        decoder.decode(msgspec.msgpack.encode(request_))
    request_.label = request_.label[:256]
    assert decoder.decode(msgspec.msgpack.encode(request_)) == request_


def test_label_problem_counts_characters() -> None:
    assert protocol.label_problem(None) is None
    assert protocol.label_problem("é" * 256) is None
    assert "at most 256 characters" in protocol.label_problem("x" * 257)


def test_an_oversized_frame_is_a_lockd_protocol_error() -> None:
    frames = protocol.FrameBuffer(limit=1024)
    frames.feed((1025).to_bytes(4, "big"))
    with pytest.raises(errors.ProtocolError, match="1025 bytes exceeds the limit of 1024") as raised:
        frames.next_frame()
    assert isinstance(raised.value, protocol.FrameTooLarge)
    assert isinstance(raised.value, errors.RemoteProtocolError)
    assert (raised.value.size, raised.value.limit) == (1025, 1024)


def test_every_error_code_becomes_exactly_one_class_and_back() -> None:
    codes = {value for name, value in vars(errors.ErrorCode).items() if not name.startswith("_")}
    table = errors._ERROR_BY_CODE
    assert set(table) == codes
    back = {cls: code for code, cls in table.items()}
    assert len(back) == len(table), "a class stands for two codes"
    for cls, code in back.items():
        assert type(errors.from_reply(protocol.Error(1, code, "m"))) is cls
    assert protocol.ErrorCode is errors.ErrorCode


def test_what_the_daemon_raises_the_client_catches_with_the_same_class() -> None:
    """A class's own `code` is sent when the daemon raises it; the client raises that class or
    a subclass of it for the code."""
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.LockdError)]
    sent = [cls for cls in classes if cls.code is not None]
    assert errors.ProtocolError in sent and errors.DaemonUnavailable in sent
    for cls in sent:
        assert issubclass(errors._ERROR_BY_CODE[cls.code], cls), cls


def test_frames_come_out_whole_however_the_stream_is_cut() -> None:
    stream = bytearray()
    messages = [protocol.Status(i, ["a"] * i) for i in range(1, 6)]
    for message in messages:
        protocol.encode_frame(msgspec.msgpack.Encoder(), message, stream)
    decoder = protocol.request_decoder()
    for cut in range(1, len(stream) + 1):
        frames = protocol.FrameBuffer(protocol.MAX_REQUEST_FRAME)
        got = []
        for at in range(0, len(stream), cut):
            frames.feed(stream[at : at + cut])
            while (body := frames.next_frame()) is not None:
                got.append(decoder.decode(body))
        assert got == messages and frames.pending == 0


def test_frames_takes_whole_frames_however_the_stream_is_cut_and_mixed_with_feed() -> None:
    stream = bytearray()
    messages = [protocol.Status(i, ["a"] * i) for i in range(1, 6)]
    for message in messages:
        protocol.encode_frame(msgspec.msgpack.Encoder(), message, stream)
    decoder = protocol.request_decoder()
    for cut in range(1, len(stream) + 1):
        frames = protocol.FrameBuffer(protocol.MAX_REQUEST_FRAME)
        got = []
        for at in range(0, len(stream), cut):
            piece = memoryview(bytes(stream[at : at + cut]))
            if at // cut % 3 == 2:  # now and then the other way, which must agree with it
                frames.feed(piece)
                bodies = []
                while (body := frames.next_frame()) is not None:
                    bodies.append(body)
            else:
                bodies, too_large = frames.frames(piece)
                assert too_large is None
            got += [decoder.decode(body) for body in bodies]
            del bodies, piece
        assert got == messages and frames.pending == 0


def test_frames_returns_the_whole_frames_before_an_oversized_prefix_and_then_refuses_it() -> None:
    frames = protocol.FrameBuffer(limit=1024)
    bodies, too_large = frames.frames(b"\0\0\0\2hi" + (1025).to_bytes(4, "big") + b"\0\0\0\2no")
    assert [bytes(body) for body in bodies] == [b"hi"]
    assert isinstance(too_large, protocol.FrameTooLarge)
    del bodies
    bodies, too_large = frames.frames(b"")  # the prefix stays pending: reported again
    assert bodies == [] and isinstance(too_large, protocol.FrameTooLarge)
    with pytest.raises(protocol.FrameTooLarge):
        frames.next_frame()
    bodies, too_large = protocol.FrameBuffer(limit=1024).frames(b"\0\0" + b"\4\1")
    assert bodies == [] and isinstance(too_large, protocol.FrameTooLarge)


def test_frames_put_back_come_first_at_the_next_call() -> None:
    stream = b"\0\0\0\1a\0\0\0\1b\0\0\0\1c\0\0"
    for split in (0, 2):  # bodies pointing into the read, or (a frame split) into the buffer
        frames = protocol.FrameBuffer(limit=1024)
        assert frames.frames(stream[:split]) == ([], None)
        bodies, _ = frames.frames(stream[split:])
        assert [bytes(body) for body in bodies] == [b"a", b"b", b"c"]
        frames.put_back(bodies[1:])
        del bodies
        bodies, _ = frames.frames(b"\0\1d")
        assert [bytes(body) for body in bodies] == [b"b", b"c", b"d"] and frames.pending == 0


def test_a_body_kept_past_the_next_feed_is_refused_loudly() -> None:
    frames = protocol.FrameBuffer(1024)
    frames.feed(b"\0\0\0\2hi\0\0")
    kept = frames.next_frame()
    with pytest.raises(BufferError):
        frames.feed(b"\0\3you")
    assert bytes(kept) == b"hi"  # unchanged under its holder
    del kept
    frames.feed(b"\0\3you")
    assert bytes(frames.next_frame()) == b"you"


#: Threads that each make a client connection and decode a reply at once, in a fresh process
#: switching threads as often as it can, so that one builds its decoder while another is
#: still working out how to decode a struct type.
FIRST_DECODES = """
import sys, threading
sys.setswitchinterval(1e-6)
import msgspec
from lockd_client import protocol
from lockd_client._connection import Connection
queued = protocol.frame(msgspec.msgpack.Encoder(), protocol.Queued(1, [protocol.Holder(pid=1, uid=0)]))
welcome = protocol.frame(msgspec.msgpack.Encoder(), protocol.Welcome(1, "lockd", "flock", 65536))
go = threading.Event()

def connect():
    go.wait()
    conn = Connection()
    conn.hello()
    conn.receive_data(welcome)
    conn.acquire(["x"])
    conn.receive_data(queued)

threads = [threading.Thread(target=connect) for _ in range(16)]
for thread in threads:
    thread.start()
go.set()
for thread in threads:
    thread.join()
"""


def test_connections_made_in_many_threads_at_once_decode_safely() -> None:
    # Without decoders made at import, about one such process in two crashed.
    for _ in range(10):
        proc = subprocess.run([sys.executable, "-c", FIRST_DECODES], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
