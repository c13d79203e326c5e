"""Serf's 512-byte tag limit is enforced by construction."""

from __future__ import annotations

import msgpack
import pytest

from omx.errors import ConfigError
from omx.mesh import (
    NODE_TAGS_WORST_CASE,
    SERF_META_LIMIT,
    AgentConfig,
    NodeTags,
    TagsTooLarge,
    encode_tags,
    split_host_port,
)
from omx.mesh.tags import MAX_NODE_NAME, check_node_name


def test_worst_case_node_tags_fit() -> None:
    longest = NodeTags(api="[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535", h3_port=65535,
                       inventory="v" * 64, label="L" * 63, transfer_port=65535, functions="f" * 16)
    encoded = encode_tags(longest.to_tags())
    assert len(encoded) == NODE_TAGS_WORST_CASE < SERF_META_LIMIT
    # The longest node name and these tags are accepted together by the agent config.
    AgentConfig(node_name="n" * MAX_NODE_NAME, bind="::1", tags=longest.to_tags())


def test_encoding_matches_serf_layout_and_limit() -> None:
    tags = {"a": "b"}
    assert encode_tags(tags) == b"\xff" + msgpack.packb(tags, use_bin_type=False)
    at_limit = {"k": "x" * (SERF_META_LIMIT - 1 - 1 - 2 - 3)}  # magic, fixmap, fixstr key, str16 header
    assert len(encode_tags(at_limit)) == SERF_META_LIMIT
    with pytest.raises(TagsTooLarge, match="512"):
        encode_tags({"k": "x" * (SERF_META_LIMIT - 6)})
    with pytest.raises(TagsTooLarge):
        AgentConfig(node_name="n1", tags={f"k{i}": "v" * 40 for i in range(12)})


def test_node_tags_round_trip_and_validation() -> None:
    tags = NodeTags(api="[0:0:0:0:0:0:0:1]:8080", h3_port=8080, inventory="42", label="gpu box",
                    functions="0123456789abcdef")
    assert tags.api == "[::1]:8080"
    assert NodeTags.from_tags(tags.to_tags()) == tags
    assert NodeTags.from_tags({"role": "x"}) is None
    assert NodeTags.from_tags({"omx": "1", "api": "0.0.0.0:1"}) is None
    for bad in ({"api": "0.0.0.0:8080"}, {"api": "host:8080"}, {"api": "1.2.3.4"},
                {"api": "1.2.3.4:1", "h3_port": 70000}, {"api": "1.2.3.4:1", "inventory": "x" * 65},
                {"api": "1.2.3.4:1", "label": "bad\nlabel"}, {"api": "1.2.3.4:1", "functions": "f" * 17},
                {"api": "1.2.3.4:1", "functions": "XYZ"}):
        with pytest.raises(ConfigError):
            NodeTags(**bad)  # type: ignore[arg-type]


def test_node_names_and_addresses() -> None:
    assert check_node_name("omx-1a2b3c4d") == "omx-1a2b3c4d"
    for bad in ("", "n" * (MAX_NODE_NAME + 1), "-x", "a b", "a/b"):
        with pytest.raises(ConfigError):
            check_node_name(bad)
    assert split_host_port("[::1]:4001") == ("::1", 4001)
    assert split_host_port("10.0.0.1", 4001) == ("10.0.0.1", 4001)
    assert split_host_port("fe80::1", 7) == ("fe80::1", 7)
    for bad in ("[::1", "1.2.3.4:0", "1.2.3.4:x", "[nothex]:1", "a_b:1"):
        with pytest.raises(ConfigError):
            split_host_port(bad, 1)
    with pytest.raises(ConfigError):
        split_host_port("1.2.3.4")


def test_agent_config_never_puts_secrets_on_argv() -> None:
    key = "A" * 43 + "="
    conf = AgentConfig(node_name="n1", encrypt_key=key, rpc_auth="tok-secret", profile="local")
    assert key not in repr(conf) and "tok-secret" not in repr(conf)
    with pytest.raises(ConfigError):
        AgentConfig(node_name="n1", encrypt_key="bm90IGEga2V5")
    with pytest.raises(ConfigError):
        AgentConfig(node_name="n1", profile="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        AgentConfig(node_name="n1", bind="localhost")
