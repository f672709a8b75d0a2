"""Open Inference Protocol v2: XGBoost, scikit-learn (skops) and ONNX models served beside a chat model, checked
with the official tritonclient and with hand-written requests shaped like the spec's examples."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from tests.server_utils import run_server

xgb = pytest.importorskip("xgboost", reason="the tabular extra (xgboost) is not installed")
ort = pytest.importorskip("onnxruntime", reason="the tabular extra (onnxruntime) is not installed")
sio = pytest.importorskip("skops.io", reason="the tabular extra (skops) is not installed")
onnx = pytest.importorskip("onnx", reason="the test extra (onnx) is not installed")


def _data(n: int = 400, f: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, f)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] - x[:, 2] + 0.3 * rng.normal(size=n) > 0.8).astype(int)
    return x, y


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.ensemble import HistGradientBoostingClassifier

    d = tmp_path_factory.mktemp("oip")
    x, y = _data()
    clf = xgb.XGBClassifier(n_estimators=30, max_depth=3, n_jobs=1, random_state=0).fit(x, y)
    clf.save_model(d / "fraud.json")
    clf.save_model(d / "fraud.ubj")
    hgb = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(x.astype(np.float64), y)
    sio.dump(hgb, d / "hgb.skops")
    # a logistic model as an ONNX graph: sigmoid(x @ w + b), batch axis free
    w = np.linspace(-1, 1, 6, dtype=np.float32).reshape(6, 1)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z0"]), helper.make_node("Add", ["z0", "b"], ["z"]),
         helper.make_node("Sigmoid", ["z"], ["score"])], "logit",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0.1], np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, d / "logit.onnx")
    return {"dir": d, "xgb": clf, "hgb": hgb, "x": x}


@pytest.fixture(scope="module")
def server(models, tiny_hf):
    d = models["dir"]
    with run_server("--model", str(tiny_hf), "--model", str(d / "fraud.json"), "--model", str(d / "fraud.ubj"),
                    "--model", str(d / "hgb.skops"), "--model", str(d / "logit.onnx"), "--dtype", "float32",
                    "--kv-cache-memory", "0.05", "--response-cache-size", "100") as s:
        yield s


def _infer(server, model: str, rows: np.ndarray, datatype: str = "FP32", **extra) -> httpx.Response:
    body = {"id": "42", "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": datatype,
                                    "data": rows.reshape(-1).tolist()}], **extra}
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json=body)


def test_health_and_metadata(server, tiny_hf):
    assert httpx.get(server.url + "/v2/health/live").status_code == 200
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    meta = httpx.get(server.url + "/v2/models/fraud.json").json()
    assert meta == {"name": "fraud.json", "versions": ["1"], "platform": "xgboost",
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 6]}],
                    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
                                {"name": "label", "datatype": "INT64", "shape": [-1]}]}
    assert httpx.get(server.url + "/v2/models/fraud.json/versions/1").json() == meta
    assert httpx.get(server.url + "/v2/models/fraud.json/ready").status_code == 200
    onnx_meta = httpx.get(server.url + "/v2/models/logit.onnx").json()
    assert onnx_meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 6]}]
    r = httpx.get(server.url + "/v2/models/nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]
    assert httpx.get(server.url + "/v2/models/fraud.json/versions/7").status_code == 404
    r = httpx.get(server.url + f"/v2/models/{tiny_hf.name}")
    assert r.status_code == 400 and "not a tensor model" in r.json()["error"]
    # the chat model still serves beside them
    ids = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {tiny_hf.name, "fraud.json", "hgb.skops", "logit.onnx"} <= ids


@pytest.mark.parametrize("name", ["fraud.json", "fraud.ubj"])
def test_xgboost_scores_equal_predict_proba(server, models, name):
    x = models["x"][:25]
    r = _infer(server, name, x)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == name and body["model_version"] == "1" and body["id"] == "42"
    out = {o["name"]: o for o in body["outputs"]}
    assert out["probabilities"]["shape"] == [25, 2] and out["probabilities"]["datatype"] == "FP32"
    got = np.array(out["probabilities"]["data"]).reshape(25, 2)
    np.testing.assert_allclose(got, models["xgb"].predict_proba(x), atol=1e-6, rtol=0)
    assert out["label"]["data"] == models["xgb"].predict(x).tolist()
    assert body["parameters"]["compute_s"] > 0 and "cost_usd" in body["parameters"]


def test_skops_scores_equal_predict_proba(server, models):
    x = models["x"][:10].astype(np.float64)
    r = _infer(server, "hgb.skops", x, "FP64", outputs=[{"name": "probabilities"}])
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    assert [o["name"] for o in outs] == ["probabilities"]
    np.testing.assert_allclose(np.array(outs[0]["data"]).reshape(10, 2), models["hgb"].predict_proba(x),
                               atol=1e-6, rtol=0)


def test_onnx_matches_onnxruntime(server, models):
    x = models["x"][:7]
    body = {"inputs": [{"name": "x", "shape": [7, 6], "datatype": "FP32", "data": x.tolist()}]}  # nested data
    r = httpx.post(server.url + "/v2/models/logit.onnx/infer", json=body)
    assert r.status_code == 200, r.text
    sess = ort.InferenceSession(str(models["dir"] / "logit.onnx"))
    want = sess.run(None, {"x": x})[0]
    out = r.json()["outputs"][0]
    assert out["name"] == "score" and out["shape"] == [7, 1]
    np.testing.assert_allclose(np.array(out["data"]).reshape(7, 1), want, atol=1e-6)


@pytest.mark.parametrize("inputs, needle", [
    ([{"name": "input", "shape": [1, 5], "datatype": "FP32", "data": [0.0] * 5}], "shape [1, 5]"),
    ([{"name": "input", "shape": [2, 6], "datatype": "FP32", "data": [0.0] * 6}], "needs 12 values"),
    ([{"name": "input", "shape": [1, 6], "datatype": "FP64", "data": [0.0] * 6}], "datatype FP64"),
    ([{"name": "input", "shape": [1, 6], "datatype": "FP32", "data": ["a"] * 6}], "not FP32"),
    ([{"name": "other", "shape": [1, 6], "datatype": "FP32", "data": [0.0] * 6}], "unexpected input"),
    ([{"name": "input", "shape": [6], "datatype": "FP32", "data": [0.0] * 6}], "expects [-1, 6]"),
    ([], "non-empty 'inputs'"),
])
def test_bad_requests_are_400(server, inputs, needle):
    r = httpx.post(server.url + "/v2/models/fraud.json/infer", json={"inputs": inputs})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]
    r = httpx.post(server.url + "/v2/models/fraud.json/infer", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_concurrent_requests_are_batched_and_each_gets_its_rows(server, models):
    x = models["x"][:48]

    async def go():
        async with httpx.AsyncClient(base_url=server.url) as c:
            rs = await asyncio.gather(*(c.post("/v2/models/fraud.json/infer", json={
                "inputs": [{"name": "input", "shape": [1, 6], "datatype": "FP32", "data": row.tolist()}]})
                for row in x))
            return [r.json()["outputs"][0]["data"] for r in rs]

    got = np.array(asyncio.run(go()))
    np.testing.assert_allclose(got, models["xgb"].predict_proba(x), atol=1e-6, rtol=0)


def test_response_cache_and_metrics(server, models):
    x = models["x"][100:101]
    first = _infer(server, "fraud.ubj", x).json()
    second = _infer(server, "fraud.ubj", x).json()
    assert first["parameters"]["cached"] is False and second["parameters"]["cached"] is True
    assert second["outputs"] == first["outputs"] and second["parameters"]["compute_s"] == 0
    metrics = httpx.get(server.url + "/metrics").text
    line = next(ln for ln in metrics.splitlines() if ln.startswith('inferd_compute_seconds_total{model_name="fraud.json"}'))
    assert float(line.split()[-1]) > 0


def test_tritonclient(server, models):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("fraud.json")
    assert client.get_model_metadata("fraud.json")["platform"] == "xgboost"
    x = models["x"][:4]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    res = client.infer("fraud.json", [inp], outputs=[httpclient.InferRequestedOutput("probabilities",
                                                                                      binary_data=False)])
    np.testing.assert_allclose(res.as_numpy("probabilities"), models["xgb"].predict_proba(x), atol=1e-6, rtol=0)
    bad = httpclient.InferInput("input", [1, 3], "FP32")
    bad.set_data_from_numpy(x[:1, :3], binary_data=False)
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("fraud.json", [bad])


def test_tritonclient_binary_tensors(server, models):
    """The binary tensor data extension, as the official client speaks it (its default: binary_data=True)."""
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")

    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    x = models["x"][:5]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    res = client.infer("fraud.json", [inp], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=True),
                                                     httpclient.InferRequestedOutput("label", binary_data=False)])
    out = {o["name"]: o for o in res.get_response()["outputs"]}
    assert out["probabilities"]["parameters"]["binary_data_size"] == 5 * 2 * 4 and "data" not in out["probabilities"]
    assert out["label"]["data"] == models["xgb"].predict(x).tolist()
    np.testing.assert_allclose(res.as_numpy("probabilities"), models["xgb"].predict_proba(x), atol=1e-6, rtol=0)
    res = client.infer("fraud.json", [inp])  # no outputs named: the client asks for every output in binary
    assert res.as_numpy("label").tolist() == models["xgb"].predict(x).tolist()
    np.testing.assert_allclose(res.as_numpy("probabilities"), models["xgb"].predict_proba(x), atol=1e-6, rtol=0)


def test_binary_request_by_hand_and_its_errors(server, models):
    x = models["x"][:3]
    raw = x.astype("<f4").tobytes()

    def post(head: dict, tail: bytes, length: int | None = None) -> httpx.Response:
        h = json.dumps(head).encode()
        return httpx.post(server.url + "/v2/models/fraud.json/infer", content=h + tail,
                          headers={"Inference-Header-Content-Length": str(len(h) if length is None else length)})

    inp = {"name": "input", "shape": [3, 6], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    r = post({"inputs": [inp], "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}, raw)
    assert r.status_code == 200, r.text
    n = int(r.headers["Inference-Header-Content-Length"])
    head = json.loads(r.content[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == len(r.content) - n == 3 * 2 * 4
    got = np.frombuffer(r.content[n:], dtype="<f4").reshape(3, 2)
    np.testing.assert_allclose(got, models["xgb"].predict_proba(x), atol=1e-6, rtol=0)
    for head, tail, length, needle in [
        ({"inputs": [inp]}, raw[:-4], None, "does not fit"),
        ({"inputs": [{**inp, "parameters": {"binary_data_size": 8}}]}, raw[:8], None, "72 bytes, binary_data_size is 8"),
        ({"inputs": [inp]}, raw + b"xx", None, "2 bytes after the JSON header belong to no input"),
        ({"inputs": [inp]}, raw, 10**6, "Inference-Header-Content-Length must be"),
        ({"inputs": [{k: v for k, v in inp.items() if k != "parameters"}]}, b"", None, "needs 'data' or"),
    ]:
        r = post(head, tail, length)
        assert r.status_code == 400 and needle in r.json()["error"], (needle, r.text)


def test_codec_bytes_and_bool_round_trip():
    from inferd.server.oip_codec import _from_bytes, _to_bytes

    words = np.array([b"card", b"", "caf\u00e9".encode()], dtype=object)
    raw = _to_bytes(words, "BYTES")
    assert raw[:4] == (4).to_bytes(4, "little") and len(raw) == 3 * 4 + 4 + 0 + 5
    assert _from_bytes("w", memoryview(raw), "BYTES", 3).tolist() == words.tolist()
    flags = np.array([True, False, True])
    assert _to_bytes(flags, "BOOL") == b"\x01\x00\x01"
    assert _from_bytes("f", memoryview(b"\x01\x00\x01"), "BOOL", 3).tolist() == flags.tolist()
    from inferd.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="runs past"):
        _from_bytes("w", memoryview(raw[:-1]), "BYTES", 3)


def test_skops_refuses_foreign_types_and_missing_extras_say_how(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    from inferd.errors import ModelLoadError
    from inferd.tabular import models as tm

    x, y = _data(50)
    pipe = make_pipeline(FunctionTransformer(_custom_feature), LogisticRegression()).fit(x, y)
    sio.dump(pipe, tmp_path / "pipe.skops")
    with pytest.raises(ModelLoadError, match="refusing to load types that are not scikit-learn's: tests.test_oip"):
        tm.load_tensor_model(str(tmp_path / "pipe.skops"))
    with pytest.raises(ModelLoadError, match=r"pip install 'inferd\[tabular\]'"):
        tm._need("no_such_backend_module")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="ONNX Runtime cannot load it"):
        tm.load_tensor_model(str(tmp_path / "broken.onnx"))
    assert not tm.is_tensor_model_file(str(tmp_path / "config.json"))


def _custom_feature(x: np.ndarray) -> np.ndarray:  # user code inside a model file: must not be loaded
    return x * 2
