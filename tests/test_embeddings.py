"""Encoders: all-MiniLM-L6-v2 parity with sentence-transformers, tiny BERT/classifier logic, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from inferd import Embedder
from inferd.errors import InvalidRequestError
from tests.conftest import needs_minilm


@pytest.fixture(scope="module")
def minilm_ref(reference_dir):
    texts = json.loads((reference_dir / "embeddings_minilm.json").read_text())["texts"]
    return texts, np.load(reference_dir / "embeddings_minilm.npy")


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@needs_minilm
@pytest.mark.parametrize("dtype,bound", [("float32", 0.9999), ("auto", 0.999)])
def test_minilm_matches_sentence_transformers(minilm_ref, dtype, bound):
    """Unquantized (the int8 default is tested in test_embeddings_int8.py)."""
    texts, ref = minilm_ref
    e = Embedder("all-minilm-l6-v2", dtype=dtype, cache_size=0, quantization="none")
    got = e.embed(texts)
    assert got.shape == ref.shape
    assert cos(got, ref).min() >= bound
    # same full ranking of the sentences (0..6: the non-degenerate texts) for every one of them as the query
    # (search ranking / recommendation use)
    sub_ref, sub_got = ref[:7], got[:7]
    for i in range(7):
        assert np.array_equal(np.argsort(-(sub_ref @ sub_ref[i])), np.argsort(-(sub_got @ sub_got[i])))


def test_batched_equals_single_and_padding_free(tiny_bert):
    e = Embedder(str(tiny_bert), dtype="float32", cache_size=0, max_batch_tokens=40)
    texts = ["hello there", "the app crashes on start", "my invoice is wrong and the app crashes", "x"]
    batch = e.embed(texts)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(e.embed([t])[0], batch[i], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)  # Normalize module honoured


def test_mean_pooling_by_hand(tiny_bert):
    e = Embedder(str(tiny_bert), dtype="float32", cache_size=0)
    ids = e.tokenize(["hello there friend"])
    with torch.inference_mode():
        x, _ = e.model(ids)
    want = torch.nn.functional.normalize(x.mean(0), dim=0).cpu().numpy()
    np.testing.assert_allclose(e.embed_ids(ids)[0], want, atol=1e-6)


def test_truncation_is_the_users_choice(tiny_bert):
    e = Embedder(str(tiny_bert), dtype="float32", cache_size=0)
    long = "the quick brown fox " * 20
    with pytest.raises(InvalidRequestError, match="more than this model's maximum of 24"):
        e.embed([long], truncate=False)
    assert e.embed([long], truncate=True).shape == (1, 32)
    assert len(e.tokenize([long])[0]) == 24


def test_cache_hits_and_bound(tiny_bert):
    e = Embedder(str(tiny_bert), dtype="float32", cache_size=2)
    e.embed(["a b", "c d"])
    h0 = e.cache.hits
    e.embed(["a b"])
    assert e.cache.hits == h0 + 1
    e.embed(["e f"])  # evicts the least recently used ("c d")
    assert len(e.cache.data) == 2 and e.cache.get((e.name, "c d", True)) is None


def test_classifier_probabilities(tiny_classifier):
    e = Embedder(str(tiny_classifier), dtype="float32")
    assert e.labels == ["billing", "bug", "other"]
    texts = ["my invoice is wrong", "the app crashes on start"]
    probs = e.classify(texts)
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    ids = e.tokenize(texts[:1])
    with torch.inference_mode():
        x, _ = e.model(ids)
        pooled = torch.tanh(e.model.pooler(x[0]))
        want = torch.softmax(e.model.classifier(pooled), -1).cpu().numpy()
    np.testing.assert_allclose(probs[0], want, atol=1e-5)


def test_embed_cli(tiny_bert, tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("hello there\nmy invoice is wrong\n")
    out = tmp_path / "v.npy"
    r = subprocess.run([sys.executable, "-m", "inferd.cli", "embed", "--model", str(tiny_bert), "--dtype", "float32",
                        "--file", str(f), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    v = np.load(out)
    e = Embedder(str(tiny_bert), dtype="float32")
    np.testing.assert_allclose(v, e.embed(["hello there", "my invoice is wrong"]), atol=1e-5)
    r = subprocess.run([sys.executable, "-m", "inferd.cli", "embed", "--model", str(tiny_bert), "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and len(json.loads(r.stdout)["embedding"]) == 32
