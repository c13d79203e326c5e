"""Holdings: the version, the peer wire format, the metadata file and the store scan."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omx.errors import PeerError
from omx.mesh import NodeTags
from omx.storage.holdings import (
    MAX_FACTOR,
    FactorOverride,
    Holdings,
    Incoming,
    PartialHolding,
    canonical_name,
    merge_factors,
    model_key,
)
from omx.storage.holdings_meta import HoldingsMeta, MetaState
from omx.storage.holdings_wire import holdings_from_json, holdings_to_json
from omx.types import BlobDigest
from tests.support.placement import GB, holdings, model, partial_of

CS = 64 * 1024


def sample() -> Holdings:
    m = model("m", origin="replica", last_used=5.0)
    other = model("other")
    return holdings(m, free=7 * GB, cache_limit=9 * GB,
                    partials=[partial_of(other.blobs[1], held=[0, 3, 9])],
                    incoming=[Incoming("other:latest", other.digest, "replica", 1.0, 2.0)],
                    factors=[FactorOverride("m:latest", 3, 10.0), FactorOverride("gone:latest", None, 11.0)])


# ---------------------------------------------------------------- model keys, partials, space


def test_model_keys_are_canonical_and_case_free() -> None:
    assert model_key("Tiny") == model_key("tiny:latest") == model_key("library/TINY:latest") == "tiny:latest"
    assert model_key("hf.co/Org/M:Q4") == "hf.co/org/m:q4"
    assert model_key("not a name!") == "not a name!"


def test_partial_holding_counts_chunks_and_bytes() -> None:
    p = PartialHolding(BlobDigest("sha256:" + "1" * 64), size=10 * CS + 5, chunk_size=CS,
                       have=bytes([0b1000_0001, 0b1111_1100]))
    # 11 chunks; bits past chunk 10 are ignored.
    assert p.chunk_count == 11 and p.held() == [0, 7, 10] and p.held_count == 3
    assert p.held_bytes == 2 * CS + 5
    assert p.has_chunk(7) and not p.has_chunk(1) and not p.has_chunk(11)
    assert p.progress_step == 3 * 4 // 11


def test_room_and_missing_bytes() -> None:
    h = sample()
    assert h.used_bytes == GB + 100 + 3 * (1 << 20)
    assert h.room == min(7 * GB, 9 * GB - h.used_bytes)
    assert replace(h, cache_limit=None).room == 7 * GB
    assert replace(h, cache_limit=1).room == 0
    other = model("other")
    assert h.missing_bytes(other.blobs) == other.size - 3 * (1 << 20)
    assert h.missing_bytes(model("m").blobs) == 0


def test_factor_merge_is_last_writer_wins_with_ties_to_the_larger_factor() -> None:
    merged = merge_factors([FactorOverride("m", 3, 10.0), FactorOverride("M:latest", 1, 12.0),
                            FactorOverride("m", 2, 12.0), FactorOverride("n", None, 1.0)])
    assert merged["m:latest"].factor == 2 and merged["n:latest"].factor is None


# ---------------------------------------------------------------- the version


def test_version_is_short_valid_as_a_tag_and_zero_when_empty() -> None:
    assert Holdings().version == "0"
    v = sample().version
    assert len(v) == 16 and NodeTags(api="127.0.0.1:1", inventory=v).to_tags()["inv"] == v


def test_version_ignores_jitter_but_follows_every_placement_fact() -> None:
    h = sample()
    m = h.models[0]
    same = [
        replace(h, free_bytes=1, cache_limit=None),
        replace(h, models=(replace(m, last_used=99.0, modified_at=3.0),)),
        replace(h, incoming=(replace(h.incoming[0], updated_at=50.0),)),
        replace(h, partials=(replace(h.partials[0], have=bytes([0b0000_0110, 0b1000_0000, 0])),)),
    ]
    for other in same:
        assert other.version == h.version
    different = [
        replace(h, models=(replace(m, origin="user"),)),
        replace(h, models=(replace(m, digest=BlobDigest("sha256:" + "2" * 64)),)),
        replace(h, models=(replace(m, created_at=123.0),)),
        replace(h, models=()),
        replace(h, blobs=h.blobs[1:]),
        replace(h, blobs=(replace(h.blobs[0], root="a" * 64), *h.blobs[1:])),
        replace(h, partials=(replace(h.partials[0], have=bytes([255] * 120)),)),
        replace(h, partials=()),
        replace(h, incoming=()),
        replace(h, factors=(FactorOverride("m:latest", 4, 10.0),)),
        replace(h, factors=(FactorOverride("m:latest", 3, 11.0),)),
    ]
    versions = {d.version for d in different}
    assert h.version not in versions and len(versions) == len(different)


# ---------------------------------------------------------------- the wire


def test_json_round_trip() -> None:
    h = sample()
    doc = holdings_to_json(h)
    assert doc["version"] == h.version
    assert doc["models"][0]["name"] == "m:latest" and doc["models"][0]["size"] == GB + 100
    back = holdings_from_json(json.loads(json.dumps(doc)))
    assert back == h and back.version == h.version


@st.composite
def random_holdings(draw: st.DrawFn) -> Holdings:
    names = draw(st.lists(st.sampled_from(["a", "b:v1", "ns/c:x", "host.io/ns/d:7"]), unique=True, max_size=4))
    ms = [model(n, draw(st.integers(1, 3)), size=draw(st.integers(0, 10 * GB)),
                origin=draw(st.sampled_from(("user", "replica", "demand"))),
                last_used=draw(st.floats(0, 2e9)), created_at=draw(st.floats(0, 2e9))) for n in names]
    parts = [partial_of(model(f"p{i}", size=draw(st.integers(1, 40 << 20))).blobs[1],
                        held=draw(st.sets(st.integers(0, 39), max_size=8))) for i in range(draw(st.integers(0, 3)))]
    parts = [replace(p, have=bytes(p.have)) for p in parts]
    return holdings(*ms, free=draw(st.integers(0, 1 << 50)), partials=parts,
                    cache_limit=draw(st.one_of(st.none(), st.integers(0, 1 << 50))),
                    factors=[FactorOverride(canonical_name(n), draw(st.one_of(st.none(), st.integers(1, MAX_FACTOR))),
                                            draw(st.floats(0, 2e9))) for n in names[:2]])


@settings(max_examples=150, deadline=None)
@given(random_holdings())
def test_json_round_trip_of_random_holdings(h: Holdings) -> None:
    back = holdings_from_json(json.loads(json.dumps(holdings_to_json(h))))
    assert back == h and back.version == h.version


def _doc() -> dict[str, Any]:
    return json.loads(json.dumps(holdings_to_json(sample())))


def _bad(path: str, value: Any) -> dict[str, Any]:
    doc = _doc()
    *parents, last = path.split(".")
    target: Any = doc
    for p in parents:
        target = target[int(p)] if p.isdigit() else target[p]
    target[int(last) if last.isdigit() else last] = value
    return doc


BAD = [
    ("models.0.digest", "sha256:xyz"),
    ("models.0.digest", "SHA256:" + "a" * 64),
    ("models.0.size", -1),
    ("models.0.size", 1 << 60),
    ("models.0.size", "12"),
    ("models.0.size", 1.5),
    ("models.0.size", True),
    ("models.0.name", "../../etc/passwd"),
    ("models.0.name", ""),
    ("models.0.name", "x" * 700),
    ("models.0.origin", "stolen"),
    ("models.0.blobs", []),
    ("models.0.blobs", [{"digest": "sha256:" + "a" * 64, "size": 1}] * 2000),
    ("models.0.last_used", float("nan")),
    ("models.0.created_at", -5.0),
    ("models", [{}]),
    ("models", "all of them"),
    ("blobs.0.chunk_size", 1),
    ("blobs.0.root", "nothex"),
    ("partials.0.have", "!!!"),
    ("partials.0.have", base64.b64encode(b"\0" * 500).decode()),
    ("partials.0.chunk_size", 0),
    ("factors.0.factor", 0),
    ("factors.0.factor", MAX_FACTOR + 1),
    ("factors.0.factor", -3),
    ("free_bytes", -1),
    ("cache_limit", "big"),
    ("incoming.0.origin", None),
]


@pytest.mark.parametrize(("path", "value"), BAD, ids=[f"{p}={str(v)[:20]}" for p, v in BAD])
def test_malformed_peer_json_is_refused(path: str, value: Any) -> None:
    with pytest.raises(PeerError):
        holdings_from_json(_bad(path, value))


def test_other_malformed_documents_are_refused() -> None:
    for doc in (None, [], "x", 3):
        with pytest.raises(PeerError):
            holdings_from_json(doc)
    twice = _doc()
    twice["models"].append(dict(twice["models"][0], name="M"))
    with pytest.raises(PeerError, match="twice"):
        holdings_from_json(twice)
    too_many = _doc()
    too_many["blobs"] = [too_many["blobs"][0]] * 100_001
    with pytest.raises(PeerError):
        holdings_from_json(too_many)


def test_unknown_fields_are_ignored_and_names_are_canonicalised() -> None:
    doc = _doc()
    doc["future"] = {"x": 1}
    doc["models"][0]["name"] = "library/m"
    doc["models"][0]["extra"] = 1
    h = holdings_from_json(doc)
    assert h.models[0].name == "m:latest"
    assert holdings_from_json({}) == Holdings()


# ---------------------------------------------------------------- the metadata file


def test_meta_records_persist_and_touch_is_throttled(tmp_path: Path) -> None:
    meta = HoldingsMeta(tmp_path, touch_every_s=60.0)
    d = BlobDigest("sha256:" + "a" * 64)
    meta.record("m:latest", d, origin="replica", created_at=5.0, now=100.0)
    meta.touch("M", 130.0)  # in memory only: within the throttle window
    assert meta.state().record_for("m", d) == meta.state().models["m:latest"]
    assert meta.last_used("m") == 130.0
    assert HoldingsMeta(tmp_path).last_used("m") == 100.0
    meta.touch("m", 200.0)
    assert HoldingsMeta(tmp_path).last_used("m") == 200.0
    assert meta.state().record_for("m", BlobDigest("sha256:" + "b" * 64)) is None
    meta.touch("unknown", 300.0)
    meta.forget("m")
    assert HoldingsMeta(tmp_path).state().models == {}


def test_meta_factors_transfers_and_pruning(tmp_path: Path) -> None:
    meta = HoldingsMeta(tmp_path, touch_every_s=10.0)
    d = BlobDigest("sha256:" + "a" * 64)
    assert meta.set_factor("m", 3, 10.0) == FactorOverride("m:latest", 3, 10.0)
    with pytest.raises(ValueError):
        meta.set_factor("m", 0, 11.0)
    with pytest.raises(ValueError):
        meta.set_factor("m", MAX_FACTOR + 1, 11.0)
    assert not meta.adopt_factors([FactorOverride("m", 1, 9.0)])
    assert meta.adopt_factors([FactorOverride("m", 1, 12.0), FactorOverride("n", 2, 1.0)])
    assert {k: f.factor for k, f in HoldingsMeta(tmp_path).state().factors.items()} == {"m:latest": 1, "n:latest": 2}
    meta.begin("m", d, origin="replica", now=20.0)
    meta.progress("m", 25.0)
    assert HoldingsMeta(tmp_path).state().incoming["m:latest"].updated_at == 20.0
    meta.progress("m", 31.0)
    assert HoldingsMeta(tmp_path).state().incoming["m:latest"].updated_at == 31.0
    meta.end("m")
    assert HoldingsMeta(tmp_path).state().incoming == {}
    meta.record("a", d, origin="user", created_at=1.0, now=1.0)
    meta.record("b", d, origin="user", created_at=1.0, now=1.0)
    meta.prune(["A:latest"])
    assert set(HoldingsMeta(tmp_path).state().models) == {"a:latest"}


def test_a_corrupt_meta_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "cluster" / "holdings.json"
    path.parent.mkdir()
    path.write_text("{not json")
    meta = HoldingsMeta(tmp_path)
    assert meta.state() == MetaState()
    assert (tmp_path / "cluster" / "holdings.json.corrupt").read_text() == "{not json"
    meta.set_factor("m", 2, 1.0)
    assert json.loads(path.read_text())["factors"][0]["factor"] == 2
