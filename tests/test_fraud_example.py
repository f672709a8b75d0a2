"""examples/fraud end to end: train on the synthetic transactions, export XGBoost JSON and ONNX, serve the ONNX
file, score a stream with the example's own client; ONNX scores equal XGBoost's own within 1e-5."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.server_utils import run_server

xgb = pytest.importorskip("xgboost", reason="the tabular extra (xgboost) is not installed")
pytest.importorskip("onnxruntime", reason="the tabular extra (onnxruntime) is not installed")
pytest.importorskip("onnxmltools", reason="the tabular extra (onnxmltools) is not installed")
pytest.importorskip("sklearn", reason="the tabular extra (scikit-learn) is not installed")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fraud" / "fraud.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("fraud_example", EXAMPLE)
    fraud = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(fraud)
    out = tmp_path_factory.mktemp("fraud")
    fraud.cmd_train(argparse.Namespace(out=str(out), n=8000, seed=0))
    native = xgb.XGBClassifier()
    native.load_model(out / "fraud.json")
    return fraud, out, native


def test_onnx_export_scores_equal_native(trained):
    from inferd.tabular.models import load_tensor_model

    fraud, out, native = trained
    m = load_tensor_model(str(out / "fraud.onnx"))  # what the server runs
    assert m.platform == "onnxruntime_onnx" and m.batchable
    assert [(s.name, s.datatype, s.shape) for s in m.inputs] == [("input", "FP32", (-1, len(fraud.FEATURES)))]
    rows = np.load(out / "stream.npy")
    got = m.predict({"input": rows})
    want = native.predict_proba(rows)
    assert np.abs(got["probabilities"] - want).max() <= 1e-5
    assert (got["label"] == native.predict(rows)).mean() > 0.999  # ties at exactly 0.5 may round either way
    assert want[:, 1].max() > 0.1  # not a constant model: some transactions pass the example's flag threshold


def test_served_onnx_model_scores_the_stream(trained):
    fraud, out, native = trained
    rows = np.load(out / "stream.npy")[:64]
    with run_server("--model", str(out / "fraud.onnx"), wait="/v2/health/ready") as s:
        lat, probs, wall = asyncio.run(fraud.score_stream(s.url, "fraud.onnx", rows, 8))
    assert len(lat) == 64 and all(t > 0 for t in lat) and wall > 0
    np.testing.assert_allclose(probs, native.predict_proba(rows)[:, 1], atol=1e-5, rtol=0)
