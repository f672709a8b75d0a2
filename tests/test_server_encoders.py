"""Embeddings, score and classify endpoints, served beside a chat model, through the official openai client."""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest

from inferd import Embedder
from tests.server_utils import run_server


@pytest.fixture(scope="module")
def server(tiny_hf, tiny_bert, tiny_classifier):
    with run_server("--model", str(tiny_hf), "--model", str(tiny_bert), "--model", str(tiny_classifier),
                    "--dtype", "float32", "--kv-cache-memory", "0.05", "--embedding-cache-size", "100") as s:
        yield s


@pytest.fixture(scope="module")
def direct(tiny_bert) -> Embedder:
    return Embedder(str(tiny_bert), dtype="float32", cache_size=0)


def test_models_listed(server, tiny_hf, tiny_bert, tiny_classifier):
    ids = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert ids == {tiny_hf.name, tiny_bert.name, tiny_classifier.name}


def test_openai_client_float_and_base64(server, tiny_bert, direct):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    texts = ["hello there", "my invoice is wrong"]
    r = client.embeddings.create(model=tiny_bert.name, input=texts)  # the client asks for base64 by default
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, direct.embed(texts), atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(x) for x in direct.tokenize(texts))
    raw = httpx.post(server.url + "/v1/embeddings", json={"model": tiny_bert.name, "input": "hello there",
                                                          "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, direct.embed(["hello there"])[0], atol=1e-5)
    r = client.embeddings.create(model=tiny_bert.name, input=[[2, 10, 11, 3]], encoding_format="float")
    np.testing.assert_allclose(r.data[0].embedding, direct.embed_ids([[2, 10, 11, 3]])[0], atol=1e-5)


def test_concurrent_requests_get_their_own_vectors(server, tiny_bert, direct):
    texts = [f"text {i} " + "word " * (i % 4) for i in range(24)]

    async def go():
        async with httpx.AsyncClient(base_url=server.url) as c:
            rs = await asyncio.gather(*(c.post("/v1/embeddings", json={"model": tiny_bert.name, "input": t,
                                                                        "encoding_format": "float"}) for t in texts))
            return [r.json()["data"][0]["embedding"] for r in rs]

    got = np.array(asyncio.run(go()))
    np.testing.assert_allclose(got, direct.embed(texts), atol=1e-5)


def test_cache_hits_in_metrics(server, tiny_bert):
    body = {"model": tiny_bert.name, "input": ["cache me please"], "encoding_format": "float"}
    first = httpx.post(server.url + "/v1/embeddings", json=body).json()["usage"]["inferd"]
    second = httpx.post(server.url + "/v1/embeddings", json=body).json()["usage"]["inferd"]
    assert first["compute_s"] > 0 and second["compute_s"] == 0  # the second came from the cache
    text = httpx.get(server.url + "/metrics").text
    hits = [ln for ln in text.splitlines() if ln.startswith("inferd_embedding_cache_hits_total")]
    assert hits and float(hits[0].rsplit(" ", 1)[1]) >= 1
    assert "inferd_embedding_cache_misses_total" in text


def test_score_ranks_documents(server, tiny_bert, direct):
    docs = ["the app crashes on start", "my invoice is wrong", "hello there"]
    r = httpx.post(server.url + "/v1/score", json={"model": tiny_bert.name, "query": "my invoice", "documents": docs})
    assert r.status_code == 200
    body = r.json()
    want = direct.score("my invoice", docs)
    np.testing.assert_allclose([d["score"] for d in body["data"]], want, atol=1e-5)
    assert [x["index"] for x in body["results"]] == list(np.argsort(-want))
    r = httpx.post(server.url + "/score", json={"model": tiny_bert.name, "text_1": "my invoice", "text_2": docs})
    assert len(r.json()["data"]) == 3


def test_classify(server, tiny_classifier):
    r = httpx.post(server.url + "/v1/classify", json={"model": tiny_classifier.name,
                                                      "input": ["my invoice is wrong", "the app crashes"]})
    assert r.status_code == 200
    data = r.json()["data"]
    e = Embedder(str(tiny_classifier), dtype="float32")
    probs = e.classify(["my invoice is wrong", "the app crashes"])
    for d, p in zip(data, probs):
        assert d["label"] == e.labels[int(p.argmax())]
        np.testing.assert_allclose(list(d["probs"].values()), p, atol=1e-5)


@pytest.mark.parametrize("body,status,needle", [
    ({"input": ""}, 400, "empty"),
    ({"input": ["ok", ""]}, 400, "input 1"),
    ({"input": []}, 400, "empty"),
    ({"input": "word " * 100}, 400, "maximum of 24"),
    ({"input": "hello", "dimensions": 8}, 400, "dimensions"),
    ({"input": [[10**6]]}, 400, "out of range"),
    ({"input": "hello", "model": "nope"}, 404, "does not exist"),
])
def test_bad_embedding_input(server, tiny_bert, body, status, needle):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": tiny_bert.name, **body})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_truncate_prompt_tokens_allows_long_input(server, tiny_bert):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": tiny_bert.name, "input": "word " * 100,
                                                        "truncate_prompt_tokens": -1, "encoding_format": "float"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 24


def test_classify_on_embedding_model_is_400(server, tiny_bert):
    r = httpx.post(server.url + "/v1/classify", json={"model": tiny_bert.name, "input": "x"})
    assert r.status_code == 400
