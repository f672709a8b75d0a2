"""The infer route's fast path (FastInferPath): POST .../infer skips FastAPI's stack but keeps the app's own
middleware: the API key (401), the body limit (413, declared or streamed), plus the route's path parsing."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from inferd.server.app import build_app
from inferd.server.metrics import Metrics
from inferd.server.oip import FastInferPath, infer_path_params, load_tensor_service
from inferd.server.state import ModelSlot, ServerState

xgb = pytest.importorskip("xgboost", reason="the tabular extra (xgboost) is not installed")


def test_infer_path_params():
    assert infer_path_params("/v2/models/fraud.json/infer") == {"name": "fraud.json"}
    assert infer_path_params("/v2/models/m/versions/1/infer") == {"name": "m", "version": "1"}
    for path in ("/v2/models//infer", "/v2/models/m/infer/", "/v2/models/m", "/v2/models/m/ready",
                 "/v2/models/m/versions//infer", "/v2/model/m/infer", "v2/models/m/infer", "/v1/models/m/infer",
                 "/v2/models/m/versions/1/2/infer"):
        assert infer_path_params(path) is None, path


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    clf = xgb.XGBClassifier(n_estimators=10, max_depth=3, n_jobs=1, random_state=0).fit(x, x[:, 0] > 0)
    clf.save_model(d / "m.json")
    slot = ModelSlot(spec=str(d / "m.json"), names=["m.json"], kind="tensor", status="ready")
    slot.service = load_tensor_service(slot.spec, "m.json", 8, 0.0, 16, 0)
    state = ServerState(slots=[slot], metrics=Metrics(), api_key="k", max_body_bytes=300)
    state.metrics.add_model("m.json")
    with TestClient(build_app(state, webui_pages=False)) as c:
        yield c, clf, x, slot.service
    slot.service.worker.stop()


def _body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}]}


KEY = {"Authorization": "Bearer k"}


def test_scores_and_versions_through_the_fast_path(client):
    c, clf, x, svc = client
    r = c.post("/v2/models/m.json/infer", json=_body(x[:2]), headers=KEY)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert np.allclose(np.array(out["data"]).reshape(out["shape"]), clf.predict_proba(x[:2]), atol=1e-6)
    assert isinstance(c.app.middleware_stack, FastInferPath)  # the request above went the fast way
    assert c.post("/v2/models/m.json/versions/1/infer", json=_body(x[:1]), headers=KEY).status_code == 200
    r = c.post("/v2/models/m.json/versions/2/infer", json=_body(x[:1]), headers=KEY)
    assert r.status_code == 404 and "no version '2'" in r.json()["error"]
    r = c.post("/v2/models/nope/infer", json=_body(x[:1]), headers=KEY)
    assert r.status_code == 404 and "does not exist" in r.json()["error"]
    assert c.get("/v2/models/m.json/infer", headers=KEY).status_code == 405  # other methods: the full stack
    assert svc.worker.stats.items >= 3


def test_api_key_is_checked(client):
    c, _, x, _ = client
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = c.post("/v2/models/m.json/infer", json=_body(x[:1]), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_body_limit_declared_and_streamed(client):
    c, _, x, _ = client
    big = _body(x[:20])  # well over the 300-byte limit
    r = c.post("/v2/models/m.json/infer", json=big, headers=KEY)
    assert r.status_code == 413 and "300 bytes" in r.text
    import json

    raw = json.dumps(big).encode()
    # a chunked body (no content-length): the limit trips while reading, and the answer is still a 413
    r = c.post("/v2/models/m.json/infer", content=iter([raw[:200], raw[200:]]), headers=KEY)
    assert r.status_code == 413 and "300 bytes" in r.text
    assert c.post("/v2/models/m.json/infer", json=_body(x[:1]), headers=KEY).status_code == 200
