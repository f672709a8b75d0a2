"""Tensor models for the Open Inference Protocol: ONNX (ONNX Runtime), XGBoost (native .json/.ubj) and
scikit-learn (.skops). Each is loaded from its own safe format (never pickle) and described by named, typed
input and output tensors; `predict` maps {input name: array} → {output name: array}, rows along axis 0.

    m = load_tensor_model("fraud.json")
    m.inputs   → [TensorSpec("input", "FP32", [-1, 12])]
    m.predict({"input": x})  → {"probabilities": (n, 2) float32, "label": (n,) int64}

The backends are optional extras (`pip install inferd[tabular]`), imported when a model of their kind loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inferd.errors import ModelLoadError

# OIP datatype ↔ numpy
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_ONNX_TYPES = {"tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
               "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
               "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
               "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
               "tensor(string)": "BYTES"}
SUFFIXES = (".onnx", ".json", ".ubj", ".skops")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # OIP name: FP32, INT64, ...
    shape: tuple[int, ...]  # -1: any size

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class TensorModel:
    name: str
    platform: str  # onnxruntime_onnx | xgboost | sklearn (Triton's platform names where it has them)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    predict: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

    @property
    def batchable(self) -> bool:
        """Rows of different requests can be stacked into one call (every input's first axis is free)."""
        return all(s.shape and s.shape[0] == -1 for s in self.inputs + self.outputs)


def is_tensor_model_file(spec: str) -> bool:
    """A .onnx / .ubj / .skops file, or a .json file that is an XGBoost model (not a chat model's config)."""
    path = Path(spec).expanduser()
    if not path.is_file() or path.suffix not in SUFFIXES:
        return False
    if path.suffix != ".json":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'"learner"' in head


def load_tensor_model(spec: str, name: str | None = None) -> TensorModel:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {spec}")
    name = name or path.name
    loaders = {".onnx": _load_onnx, ".json": _load_xgboost, ".ubj": _load_xgboost, ".skops": _load_skops}
    if path.suffix not in loaders:
        raise ModelLoadError(f"{path}: not a tensor model file (expected one of {', '.join(SUFFIXES)})")
    return loaders[path.suffix](path, name)


def _need(module: str, extra: str = "tabular"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelLoadError(f"serving this model needs the {module!r} package: pip install 'inferd[{extra}]' "
                             f"({exc})") from exc


# ---- ONNX ------------------------------------------------------------------------------------------------
def _load_onnx(path: Path, name: str) -> TensorModel:
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # single-row requests: a thread pool costs more than it gives
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc

    def spec(a) -> TensorSpec | None:
        if a.type not in _ONNX_TYPES:
            return None  # e.g. a sequence of maps (ZipMap): not a tensor, not served
        return TensorSpec(a.name, _ONNX_TYPES[a.type], tuple(d if isinstance(d, int) else -1 for d in a.shape))

    inputs = [spec(a) for a in sess.get_inputs()]
    if any(s is None for s in inputs):
        raise ModelLoadError(f"{path}: an input is not a tensor; only tensor inputs can be served")
    outputs = [s for s in map(spec, sess.get_outputs()) if s is not None]
    if not outputs:
        raise ModelLoadError(f"{path}: the model has no tensor outputs")
    out_names = [s.name for s in outputs]

    def predict(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(out_names, sess.run(out_names, x)))

    return TensorModel(name, "onnxruntime_onnx", inputs, outputs, predict)  # type: ignore[arg-type]


# ---- XGBoost -----------------------------------------------------------------------------------------------
def _load_xgboost(path: Path, name: str) -> TensorModel:
    xgb = _need("xgboost")
    try:
        booster = xgb.Booster(model_file=str(path))
    except Exception as exc:  # noqa: BLE001 - XGBoostError for a bad file
        raise ModelLoadError(f"{path}: XGBoost cannot load it: {exc}") from exc
    booster.set_param({"nthread": 1})
    cfg = json.loads(booster.save_config())
    objective = cfg["learner"]["objective"]["name"]
    n_class = int(cfg["learner"]["learner_model_param"].get("num_class", "0") or 0)
    inputs = [TensorSpec("input", "FP32", (-1, booster.num_features()))]

    if objective.startswith("binary:"):
        outputs = [TensorSpec("probabilities", "FP32", (-1, 2)), TensorSpec("label", "INT64", (-1,))]

        def predict(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            p = booster.inplace_predict(x["input"], validate_features=False).astype(np.float32)
            return {"probabilities": np.stack([1 - p, p], axis=1), "label": (p > 0.5).astype(np.int64)}
    elif objective in ("multi:softprob", "multi:softmax"):
        outputs = [TensorSpec("probabilities", "FP32", (-1, n_class)), TensorSpec("label", "INT64", (-1,))]

        def predict(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if objective == "multi:softprob":
                prob = booster.inplace_predict(x["input"], validate_features=False).astype(np.float32)
            else:  # softmax predicts labels; probabilities from the margins
                m = booster.inplace_predict(x["input"], validate_features=False, output_margin=True)
                e = np.exp(m - m.max(axis=1, keepdims=True))
                prob = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
            return {"probabilities": prob, "label": prob.argmax(axis=1).astype(np.int64)}
    else:
        outputs = [TensorSpec("predictions", "FP32", (-1,))]

        def predict(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"predictions": booster.inplace_predict(x["input"], validate_features=False).astype(np.float32)}

    return TensorModel(name, "xgboost", inputs, outputs, predict)


# ---- scikit-learn (skops) ----------------------------------------------------------------------------------
def _load_skops(path: Path, name: str) -> TensorModel:
    sio = _need("skops.io")
    try:
        untrusted = sio.get_untrusted_types(file=str(path))
        # scikit-learn's own classes (trees, predictors) are trusted; anything else (a custom class, a function)
        # is refused rather than constructed
        foreign = [t for t in untrusted if not t.startswith("sklearn.")]
        if foreign:
            raise ModelLoadError(f"{path}: refusing to load types that are not scikit-learn's: {', '.join(foreign)}")
        est = sio.load(str(path), trusted=untrusted)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
        raise ModelLoadError(f"{path}: skops cannot load it: {exc}") from exc
    n_feat = int(getattr(est, "n_features_in_", -1))
    inputs = [TensorSpec("input", "FP64", (-1, n_feat))]
    if hasattr(est, "predict_proba"):
        n_class = len(est.classes_)
        outputs = [TensorSpec("probabilities", "FP64", (-1, n_class)), TensorSpec("label", "INT64", (-1,))]

        def predict(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            prob = est.predict_proba(x["input"])
            return {"probabilities": prob, "label": prob.argmax(axis=1).astype(np.int64)}
    else:
        outputs = [TensorSpec("predictions", "FP64", (-1,))]

        def predict(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"predictions": np.asarray(est.predict(x["input"]), dtype=np.float64)}

    return TensorModel(name, "sklearn", inputs, outputs, predict)
