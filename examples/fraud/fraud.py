"""Fraud scoring, end to end: synthetic transactions → an XGBoost model → exported as XGBoost JSON and as ONNX
→ served by inferd (Open Inference Protocol) → a stream of transactions scored one request each, with a latency
report.

    python examples/fraud/fraud.py train --out /tmp/fraud   # data set, fraud.json + fraud.onnx, held-out stream
    inferd serve --model /tmp/fraud/fraud.json --port 8000  # (another terminal; or --model /tmp/fraud/fraud.onnx)
    python examples/fraud/fraud.py score --out /tmp/fraud --url http://127.0.0.1:8000 --n 2000 --concurrency 16
    python examples/fraud/fraud.py score --out /tmp/fraud --model fraud.onnx ...   # when serving the ONNX file

Needs the tabular extra: pip install 'inferd[tabular]'.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

FEATURES = ["amount", "merchant_category", "hour", "txn_count_1h", "txn_count_24h", "amount_vs_customer_avg",
            "distance_from_home_km", "foreign", "card_present", "new_merchant"]
MERCHANT_RISK = np.array([0.0, 0.2, -0.3, 1.2, 0.1, -0.5, 0.9, 0.0, 1.6, -0.2])  # by category (10 categories)


def make_transactions(n: int, seed: int = 0, fraud_rate: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(n, 10) float32 features and 0/1 labels, ~fraud_rate positive. Fraud is likelier for large amounts far
    above the customer's usual, bursts of transactions, night hours, risky categories, foreign and card-absent
    use; labels are drawn from that probability, so the task is learnable but noisy."""
    rng = np.random.default_rng(seed)
    amount = rng.lognormal(3.5, 1.0, n)
    category = rng.integers(0, 10, n)
    hour = rng.integers(0, 24, n)
    v1h = rng.poisson(0.6, n)
    v24h = v1h + rng.poisson(3.0, n)
    ratio = amount / rng.lognormal(3.5, 0.5, n)
    distance = rng.exponential(15.0, n)
    foreign = rng.random(n) < 0.05
    card_present = rng.random(n) < 0.7
    new_merchant = rng.random(n) < 0.2
    night = (hour < 6).astype(float)
    logit = (0.9 * np.log1p(ratio) + 0.7 * v1h + 0.08 * v24h + 1.1 * night + MERCHANT_RISK[category]
             + 0.015 * distance + 1.3 * foreign - 1.2 * card_present + 0.6 * new_merchant)
    # the intercept that gives the asked-for base rate (found by bisection on the mean probability)
    lo, hi = -30.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < fraud_rate else (lo, mid)
    y = (rng.random(n) < 1 / (1 + np.exp(-(logit + lo)))).astype(np.int64)
    x = np.column_stack([amount, category, hour, v1h, v24h, ratio, distance, foreign, card_present, new_merchant])
    return x.astype(np.float32), y


def export_onnx(model, n_features: int, path: Path) -> float:
    """Write the trained XGBClassifier as ONNX (onnxmltools' XGBoost converter: a TreeEnsembleClassifier graph
    with inputs `input` (n, n_features) FP32 and outputs `label`, `probabilities`); the largest difference
    between ONNX Runtime's probabilities and XGBoost's own on 2,000 synthetic rows."""
    import onnxruntime as ort
    from onnxmltools import convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    onx = convert_xgboost(model, initial_types=[("input", FloatTensorType([None, n_features]))], target_opset=15)
    path.write_bytes(onx.SerializeToString())
    x, _ = make_transactions(2000, seed=12345)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (prob,) = sess.run(["probabilities"], {"input": x})
    return float(np.abs(prob - model.predict_proba(x)).max())


def cmd_train(args: argparse.Namespace) -> None:
    import xgboost as xgb
    from sklearn.metrics import average_precision_score, roc_auc_score

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = make_transactions(args.n, args.seed)
    split = int(0.8 * len(x))
    model = xgb.XGBClassifier(n_estimators=200, max_depth=4, learning_rate=0.1, subsample=0.8,
                              eval_metric="aucpr", tree_method="hist", n_jobs=1,
                              random_state=args.seed)
    t0 = time.perf_counter()
    model.fit(x[:split], y[:split])
    p = model.predict_proba(x[split:])[:, 1]
    model.save_model(out / "fraud.json")
    diff = export_onnx(model, x.shape[1], out / "fraud.onnx")
    np.save(out / "stream.npy", x[split:])
    np.save(out / "stream_labels.npy", y[split:])
    (out / "features.json").write_text(json.dumps(FEATURES))
    print(f"{args.n} transactions, {y.mean():.2%} fraud; trained in {time.perf_counter() - t0:.1f} s; "
          f"held-out ROC AUC {roc_auc_score(y[split:], p):.3f}, average precision "
          f"{average_precision_score(y[split:], p):.3f}")
    print(f"models: {out / 'fraud.json'} (XGBoost), {out / 'fraud.onnx'} (ONNX; max |p_onnx - p_xgboost| "
          f"{diff:.1e}); serve one: inferd serve --model {out / 'fraud.json'}")


async def score_stream(url: str, model: str, rows: np.ndarray, concurrency: int) -> tuple[list[float], list[float],
                                                                                         float]:
    """Send each row as its own request, `concurrency` at a time; (latencies s, fraud probabilities, wall s)."""
    import httpx

    lat = [0.0] * len(rows)
    probs = [0.0] * len(rows)
    nxt = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal nxt
        while nxt < len(rows):
            i, nxt = nxt, nxt + 1
            body = {"inputs": [{"name": "input", "shape": [1, rows.shape[1]], "datatype": "FP32",
                                "data": rows[i].tolist()}], "outputs": [{"name": "probabilities"}]}
            t0 = time.perf_counter()
            r = await c.post(f"/v2/models/{model}/infer", json=body)
            lat[i] = time.perf_counter() - t0
            r.raise_for_status()
            probs[i] = r.json()["outputs"][0]["data"][1]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        return lat, probs, time.perf_counter() - t0


def cmd_score(args: argparse.Namespace) -> None:
    import xgboost as xgb

    out = Path(args.out)
    rows = np.load(out / "stream.npy")[: args.n]
    labels = np.load(out / "stream_labels.npy")[: args.n]
    lat, probs, wall = asyncio.run(score_stream(args.url, args.model, rows, args.concurrency))
    local = xgb.XGBClassifier()
    local.load_model(out / "fraud.json")  # the native model, whichever file the server serves
    diff = float(np.abs(np.array(probs) - local.predict_proba(rows)[:, 1]).max())
    ms = np.array(lat) * 1000
    flagged = np.array(probs) > args.threshold
    print(f"{len(rows)} transactions, {args.concurrency} concurrent: {len(rows) / wall:.0f} req/s, latency p50 "
          f"{np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms, max {ms.max():.2f} ms")
    print(f"flagged {flagged.sum()} (threshold {args.threshold}); of them truly fraud {labels[flagged].sum()}; "
          f"fraud in the stream {labels.sum()}; served vs local score max diff {diff:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="make the data set, train and export the model")
    t.add_argument("--out", default="/tmp/fraud")
    t.add_argument("--n", type=int, default=100_000)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("score", help="score the held-out stream against a running server")
    s.add_argument("--out", default="/tmp/fraud")
    s.add_argument("--url", default="http://127.0.0.1:8000")
    s.add_argument("--model", default="fraud.json", help="the served model's name (fraud.onnx for the ONNX file)")
    s.add_argument("--n", type=int, default=2000)
    s.add_argument("--concurrency", type=int, default=16)
    s.add_argument("--threshold", type=float, default=0.1, help="flag above this fraud probability")
    s.set_defaults(func=cmd_score)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
