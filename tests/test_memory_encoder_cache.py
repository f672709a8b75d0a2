"""The encoder cache (loader/module_cache.py): the first load of an embedding model writes the built model (compute
dtype, W8A8 layers) under $INFERD_HOME/repack and maps it, later loads map it without rebuilding (counted, not
timed), the output is the same as a load without the cache, and a changed or damaged entry is not used."""

from __future__ import annotations

import re
import shutil
import time

import numpy as np
import pytest

from inferd.embedder import Embedder
from inferd.loader import module_cache
from tests.server_utils import run_server
from tests.test_memory_cache import _mapped_from
from tests.tiny_models import write_bert

TEXTS = ["hello there", "the app crashes on start", "my invoice is wrong and the app crashes"]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("INFERD_REPACK_CACHE", raising=False)
    return tmp_path / "home"


def _load(path, **kw) -> tuple[int, Embedder]:
    before = module_cache.LOADS
    e = Embedder(str(path), cache_size=0, device="cpu", **kw)  # the cache is for the CPU
    return module_cache.LOADS - before, e


@pytest.mark.parametrize("kw", [{"dtype": "float32", "quantization": "none"},
                                {"dtype": "bfloat16", "quantization": "none"},
                                {"dtype": "float32", "quantization": "auto"}])
def test_second_load_maps_the_built_model_with_the_same_output(tmp_path, home, monkeypatch, kw):
    bert = write_bert(tmp_path / "bert")
    with monkeypatch.context() as mp:
        mp.setenv("INFERD_REPACK_CACHE", "0")
        mapped, plain = _load(bert, **kw)
    assert mapped == 0 and not (home / "repack").exists()
    ref = plain.embed(TEXTS)

    mapped, first = _load(bert, **kw)  # builds, writes the entry, then maps it (shared with later processes)
    assert mapped == 1 and len(list((home / "repack").glob("*.safetensors"))) == 1
    mapped, second = _load(bert, **kw)
    assert mapped == 1
    for e in (first, second):
        params = [p for p in e.model.parameters()] + [b for b in e.model.buffers()]
        assert params and all(_mapped_from(t, home / "repack") for t in params)
        assert [type(m).__name__ for m in e.model.modules()] == [type(m).__name__ for m in plain.model.modules()]
        np.testing.assert_array_equal(e.embed(TEXTS), ref)


def test_changed_files_get_a_new_entry_and_a_damaged_one_is_rebuilt(tmp_path, home):
    bert = write_bert(tmp_path / "bert")
    _, a = _load(bert, dtype="float32", quantization="none")
    ref = a.embed(TEXTS)
    other = write_bert(tmp_path / "other", seed=3)
    shutil.copyfile(other / "model.safetensors", bert / "model.safetensors")  # same path, other weights
    _, b = _load(bert, dtype="float32", quantization="none")
    ref_b = b.embed(TEXTS)
    assert not np.allclose(ref_b, ref)
    del b  # maps the entry damaged below
    entries = sorted((home / "repack").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    assert len(entries) == 2

    newest = entries[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a truncated entry
    mapped, rebuilt = _load(bert, dtype="float32", quantization="none")
    assert mapped == 1  # rebuilt, written again, mapped
    np.testing.assert_array_equal(rebuilt.embed(TEXTS), ref_b)


def _serve_log(args: list[str], env: dict[str, str]) -> str:
    """Start `inferd --log-level INFO serve ARGS`, wait for /ready, stop it; its log."""
    with run_server(*args, env=env, cli=("--log-level", "INFO"), timeout=180) as server:
        return server.log()


def test_serve_logs_its_start_up_phases_and_maps_the_encoder_on_the_second_start(tmp_path, tiny_hf, tiny_bert):
    env = {"INFERD_HOME": str(tmp_path / "home"), "INFERD_REPACK_CACHE": "1", "PYTHONUNBUFFERED": "1"}
    args = ["--model", str(tiny_hf), "--model", str(tiny_bert), "--kv-cache-memory", "0.02", "--device", "cpu"]
    first = _serve_log(args, env)
    second = _serve_log(args, env)
    assert "model written to the cache" in first and "model written to the cache" not in second
    assert "model mapped from the cache" in second
    for log in (first, second):
        at = {m.group(1): float(m.group(2)) for m in re.finditer(r"start-up: (.+?) at ([0-9.]+) s after launch", log)}
        assert list(at) == ["imports done", "loading models", "every model ready"], log
        assert 0 < at["imports done"] <= at["loading models"] <= at["every model ready"]
        assert len(re.findall(r"model ready: \S+ \(loaded in [0-9.]+ s\)", log)) == 2


def test_since_launch_counts_from_the_process_start():
    from inferd.server.cli import since_launch

    a = since_launch()
    if a is None:
        pytest.skip("no /proc on this OS")
    time.sleep(0.05)
    b = since_launch()
    assert b is not None and 0 < a < b
