"""The pure text streamer: UTF-8 boundaries and stop strings."""

from __future__ import annotations

import pytest

from omx.runtime.engine._textstream import TextStream, utf8_complete_len


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"abc", 3),
        ("é".encode(), 2),
        ("é".encode()[:1], 0),
        (b"a" + "€".encode()[:2], 1),
        (b"a" + "😀".encode()[:3], 1),
        (b"a" + "😀".encode(), 5),
    ],
)
def test_utf8_complete_len(data: bytes, expected: int) -> None:
    assert utf8_complete_len(data) == expected


def feed_all(stream: TextStream, pieces: list[bytes]) -> tuple[list[str], bool]:
    out = []
    stopped = False
    for piece in pieces:
        text, stopped = stream.feed(piece)
        if text:
            out.append(text)
        if stopped:
            break
    else:
        rest = stream.flush()
        if rest:
            out.append(rest)
    return out, stopped


def test_multibyte_split_across_pieces_is_held_back() -> None:
    data = "héllo 😀!".encode()
    pieces = [data[i:i + 1] for i in range(len(data))]
    out, stopped = feed_all(TextStream(), pieces)
    assert not stopped
    assert "".join(out) == "héllo 😀!"
    assert all("\ufffd" not in part for part in out)


def test_stop_string_split_across_pieces_is_never_emitted() -> None:
    out, stopped = feed_all(TextStream(["STOP"]), [b"abc S", b"T", b"O", b"P and more"])
    assert stopped
    assert "".join(out) == "abc "
    assert not any("S" in part for part in out)


def test_false_start_of_stop_string_is_released() -> None:
    out, stopped = feed_all(TextStream(["STOP"]), [b"ST", b"ax", b" end"])
    assert not stopped
    assert "".join(out) == "STax end"


def test_earliest_stop_wins() -> None:
    out, stopped = feed_all(TextStream(["b", "a"]), [b"xxab"])
    assert stopped
    assert out == ["xx"]
