from __future__ import annotations

import pkgutil

import omx.storage


def test_all_lists_exactly_the_public_names() -> None:
    exported = set(omx.storage.__all__)
    assert len(exported) == len(omx.storage.__all__)
    for name in exported:
        assert hasattr(omx.storage, name), name
    public = {n for n in vars(omx.storage) if not n.startswith("_")}
    modules = {m.name for m in pkgutil.iter_modules(omx.storage.__path__)}
    assert public - modules - {"annotations"} == exported
