"""Pure formatting helpers of the CLI: sizes, times, durations, show sections, banner."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from omx.cli.client import CliFailure, normalize_url
from omx.cli.format import go_duration, human_bytes, human_number, human_time, parse_timestamp, processor
from omx.cli.models import show_sections
from omx.cli.node import banner, start_overrides
from omx.cli.run import ChatSession, metrics_summary


@pytest.mark.parametrize(("size", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "1 KB"), (253_000_000, "253 MB"), (2_019_393_189, "2.0 GB"),
    (1_500_000_000, "1.5 GB"), (4_000_000_000, "4 GB"), (15_300_000_000, "15 GB"), (2 * 10**12, "2 TB"),
])
def test_human_bytes(size: int, text: str) -> None:
    assert human_bytes(size) == text


def test_human_number() -> None:
    assert human_number(3_212_749_888) == "3.2B"
    assert human_number(7_000_000_000) == "7B"
    assert human_number(268_098_176) == "268.10M"
    assert human_number(512) == "512"


def test_human_time_past_future_forever() -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert human_time(now - timedelta(minutes=2), now=now) == "2 minutes ago"
    assert human_time(now - timedelta(seconds=30), now=now) == "30 seconds ago"
    assert human_time(now - timedelta(days=3), now=now) == "3 days ago"
    assert human_time(now + timedelta(minutes=4, seconds=30), now=now) == "4 minutes from now"
    assert human_time(now + timedelta(days=365 * 300), now=now) == "Forever"
    assert human_time(None, now=now, zero="Never") == "Never"


def test_parse_timestamp_nanoseconds_and_zero() -> None:
    parsed = parse_timestamp("2024-05-01T10:20:30.123456789-07:00")
    assert parsed == datetime(2024, 5, 1, 17, 20, 30, 123456, tzinfo=UTC)
    assert parse_timestamp("0001-01-01T00:00:00Z") is None
    assert parse_timestamp("garbage") is None


def test_go_duration() -> None:
    assert go_duration(1_500_000_000) == "1.5s"
    assert go_duration(523_100_000) == "523.1ms"
    assert go_duration(12_000) == "12µs"
    assert go_duration(62_500_000_000) == "1m2.5s"
    assert go_duration(0) == "0s"


def test_processor_column() -> None:
    assert processor(100, 0) == "100% CPU"
    assert processor(100, 100) == "100% GPU"
    assert processor(100, 25) == "75%/25% CPU/GPU"


def test_show_sections_like_ollama() -> None:
    data = {
        "details": {"parameter_size": "268.10M", "quantization_level": "Q4_K_M", "family": "gemma3"},
        "model_info": {"general.architecture": "gemma3", "gemma3.context_length": 32768,
                       "gemma3.embedding_length": 640},
        "capabilities": ["completion"],
        "parameters": 'stop                           "<end_of_turn>"\ntemperature                    1',
        "license": "Gemma Terms of Use\n\nLine two\nLine three",
    }
    sections = dict(show_sections(data))
    assert sections["Model"] == [("architecture", "gemma3"), ("parameters", "268.10M"),
                                 ("context length", "32768"), ("embedding length", "640"),
                                 ("quantization", "Q4_K_M")]
    assert sections["Capabilities"] == [("completion",)]
    assert sections["Parameters"] == [("stop", '"<end_of_turn>"'), ("temperature", "1")]
    assert sections["License"] == [("Gemma Terms of Use",), ("Line two",), ("...",)]
    assert "System" not in sections


def test_metrics_summary_has_ollama_labels_and_rates() -> None:
    text = metrics_summary({"total_duration": 2_000_000_000, "load_duration": 1_000_000,
                            "prompt_eval_count": 5, "prompt_eval_duration": 500_000_000,
                            "eval_count": 40, "eval_duration": 2_000_000_000})
    lines = text.splitlines()
    assert lines[0] == "total duration:       2s"
    assert "load duration:        1ms" in lines
    assert "prompt eval rate:     10.00 tokens/s" in lines
    assert "eval count:           40 token(s)" in lines
    assert "eval rate:            20.00 tokens/s" in lines


def test_chat_session_sends_whole_history() -> None:
    session = ChatSession("m", system="be brief", options={"keep_alive": "5m"})
    session.commit("hi", "hello")
    body = session.request("again")
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    assert body["keep_alive"] == "5m"


def test_normalize_url() -> None:
    assert normalize_url("localhost") == "http://localhost:8080"
    assert normalize_url("10.0.0.5:9000") == "http://10.0.0.5:9000"
    assert normalize_url("https://node.example:443/") == "https://node.example:443"
    assert normalize_url("0.0.0.0:8080") == "http://127.0.0.1:8080"
    assert normalize_url("[::1]:8080") == "http://[::1]:8080"
    with pytest.raises(CliFailure):
        normalize_url("host:notaport")


def test_start_overrides_from_flags() -> None:
    assert start_overrides("0.0.0.0:9000", None, 9001, 4002, ("10.0.0.2:4001", "10.0.0.3:4001"), None) == {
        "api": {"host": "0.0.0.0", "port": 9000}, "web": {"port": 9001},
        "p2p": {"port": 4002, "join": ["10.0.0.2:4001", "10.0.0.3:4001"]},
    }
    assert start_overrides("127.0.0.2", 8090, None, None, (), None) == {"api": {"host": "127.0.0.2", "port": 8090}}
    assert start_overrides(None, None, None, None, (), None) == {}


def test_banner_lines() -> None:
    lines = banner("http://127.0.0.1:8080", 8081, Path("/x/config.yaml"))
    assert "Using configuration: /x/config.yaml" in lines
    assert "   API:  http://localhost:8080" in lines
    assert "   Web:  http://localhost:8081" in lines
    assert "   Health: http://localhost:8080/health" in lines
    assert lines[-1] == "Use 'ollama-distributed status' to monitor the node."
    assert "   Web:  off (web.enabled: false)" in banner("http://10.0.0.9:8080", None, None)
    assert "   HTTP/3: https://localhost:8080 (UDP; 'omx cluster ca' prints the CA)" in banner(
        "http://127.0.0.1:8080", None, None, 8080)
    assert "   HTTP/3: off (api.http3: false)" in lines
