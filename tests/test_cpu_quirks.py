"""The AMX work-around: detected from the CPU flags, applied once to llama.cpp's model defaults."""

from __future__ import annotations

import types
from pathlib import Path

from omx.runtime.engine.cpu_quirks import amx_advertised, avoid_broken_amx


def test_amx_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n")
    assert amx_advertised(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    assert not amx_advertised(info)
    assert not amx_advertised(tmp_path / "missing")


def test_extra_buffer_types_are_turned_off_only_where_amx_is_advertised() -> None:
    class Params:
        use_extra_bufts = True

    module = types.SimpleNamespace(llama_model_default_params=Params)
    assert not avoid_broken_amx(module, advertised=False)
    assert module.llama_model_default_params().use_extra_bufts is True
    assert avoid_broken_amx(module, advertised=True)
    assert avoid_broken_amx(module, advertised=True)  # idempotent: wrapped once
    assert module.llama_model_default_params().use_extra_bufts is False
    assert module.llama_model_default_params.__name__ == "without_extra_bufts"


def test_the_real_llama_cpp_defaults_have_the_field() -> None:
    import llama_cpp.llama_cpp as lib

    assert hasattr(lib.llama_model_default_params(), "use_extra_bufts")
