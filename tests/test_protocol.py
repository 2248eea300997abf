"""The pure parts of the wire module: name and label rules, framing. No sockets."""

from __future__ import annotations

import pytest

from lockd_client import protocol


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
