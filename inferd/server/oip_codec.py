"""Open Inference Protocol request/response bodies: JSON tensors and the binary tensor data extension.

Binary extension (KServe / Triton "binary_tensor_data"): the body is a JSON header of
`Inference-Header-Content-Length` bytes followed by raw tensor bytes.

    request:  {"inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32",
                           "parameters": {"binary_data_size": 40}}],          ← 40 raw bytes follow the header
               "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}]}
               (or request "parameters": {"binary_data_output": true}: every output binary)
    response: the same layout; a binary output has "parameters": {"binary_data_size": n} and no "data".

Raw bytes are the tensor in row-major order, little-endian; BOOL one byte per element; BYTES each element as a
4-byte little-endian length and its bytes. Binary inputs take their bytes in the order they are listed.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from inferd.errors import InvalidRequestError
from inferd.tabular.models import DATATYPES, TensorModel

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[str]  # asked-for outputs in order ([] = all)
    binary: set[str]  # outputs to return as raw bytes
    id: str | None


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """(the JSON header, the raw bytes after it)."""
    raw = memoryview(body)
    if header_length is None:
        head, rest = raw, raw[len(raw):]
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidRequestError(f"{HEADER_LENGTH} must be an integer no larger than the body "
                                      f"({len(body)} bytes), got {header_length!r}")
        n = int(header_length)
        head, rest = raw[:n], raw[n:]
    try:
        return orjson.loads(head if header_length is not None else body), rest
    except ValueError:
        raise InvalidRequestError("request body is not valid JSON" + (" (the header part of a binary request)"
                                                                       if header_length is not None else "")) from None


def _from_bytes(name: str, raw: memoryview, dt: str, count: int) -> np.ndarray:
    if dt != "BYTES":
        arr = np.frombuffer(raw, dtype=DATATYPES[dt].newbyteorder("<"))
        return arr.astype(DATATYPES[dt], copy=True)  # native order, writable, not tied to the request buffer
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidRequestError(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (k,) = struct.unpack_from("<I", raw, i)
        if i + 4 + k > len(raw):
            raise InvalidRequestError(f"input {name!r}: a BYTES element runs past binary_data_size")
        items.append(raw[i + 4 : i + 4 + k].tobytes())
        i += 4 + k
    return np.array(items, dtype=object)


def _to_bytes(arr: np.ndarray, dt: str) -> bytes:
    if dt != "BYTES":
        return np.ascontiguousarray(arr, dtype=DATATYPES[dt].newbyteorder("<")).tobytes()
    parts = []
    for x in arr.reshape(-1):
        b = x if isinstance(x, bytes) else str(x).encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def parse_request(model: TensorModel, body: Any, raw: memoryview = memoryview(b"")) -> InferRequest:
    """The request checked against the model: input names, datatypes and shapes, binary sizes; 400 with the
    reason."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise InvalidRequestError("the request needs a non-empty 'inputs' list")
    want = {s.name: s for s in model.inputs}
    out: dict[str, np.ndarray] = {}
    offset = 0
    for i, t in enumerate(body["inputs"]):
        if not isinstance(t, dict) or not {"name", "shape", "datatype"} <= t.keys():
            raise InvalidRequestError(f"input {i} needs name, shape, datatype and data")
        name, shape, dt = t["name"], t["shape"], t["datatype"]
        spec = want.get(name)
        if spec is None:
            raise InvalidRequestError(f"unexpected input {name!r}; model {model.name!r} takes {', '.join(want)}")
        if dt != spec.datatype:
            raise InvalidRequestError(f"input {name!r} has datatype {dt}, model {model.name!r} expects "
                                      f"{spec.datatype}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidRequestError(f"input {name!r}: shape must be a list of non-negative integers")
        if len(shape) != len(spec.shape) or any(w != -1 and w != d for w, d in zip(spec.shape, shape)):
            raise InvalidRequestError(f"input {name!r} has shape {shape}, model {model.name!r} expects "
                                      f"{list(spec.shape)} (-1: any size)")
        count = math.prod(shape)
        size = (t.get("parameters") or {}).get("binary_data_size") if isinstance(t.get("parameters"), dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(raw):
                raise InvalidRequestError(f"input {name!r}: binary_data_size {size!r} does not fit the "
                                          f"{len(raw) - offset} bytes left after the JSON header")
            if dt != "BYTES" and size != count * DATATYPES[dt].itemsize:
                raise InvalidRequestError(f"input {name!r}: shape {shape} of {dt} is "
                                          f"{count * DATATYPES[dt].itemsize} bytes, binary_data_size is {size}")
            arr = _from_bytes(name, raw[offset : offset + size], dt, count)
            offset += size
        elif "data" in t:
            try:
                arr = np.asarray(t["data"], dtype=DATATYPES[dt])
            except (ValueError, TypeError, OverflowError) as exc:
                raise InvalidRequestError(f"input {name!r}: data is not {dt}: {exc}") from None
        else:
            raise InvalidRequestError(f"input {name!r} needs 'data' or parameters.binary_data_size")
        if arr.size != count:
            raise InvalidRequestError(f"input {name!r}: shape {shape} needs {count} values, data has {arr.size}")
        out[name] = arr.reshape(shape)
    if offset != len(raw):
        raise InvalidRequestError(f"{len(raw) - offset} bytes after the JSON header belong to no input "
                                  "(binary_data_size of the inputs adds up to less)")
    missing = [n for n in want if n not in out]
    if missing:
        raise InvalidRequestError(f"missing input(s) {', '.join(missing)} for model {model.name!r}")
    if model.batchable and len({a.shape[0] for a in out.values()}) > 1:
        raise InvalidRequestError("every input must have the same number of rows (first dimension)")

    specs = {s.name for s in model.outputs}
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    all_binary = params.get("binary_data_output") is True
    wanted: list[str] = []
    binary: set[str] = set(specs) if all_binary else set()
    for o in body.get("outputs") or []:
        if not isinstance(o, dict) or o.get("name") not in specs:
            bad = o.get("name") if isinstance(o, dict) else o
            raise InvalidRequestError(f"unknown output {bad!r}; model {model.name!r} gives {', '.join(specs)}")
        wanted.append(o["name"])
        p = o.get("parameters") if isinstance(o.get("parameters"), dict) else {}
        if p.get("binary_data") is True:
            binary.add(o["name"])
        elif p.get("binary_data") is False:
            binary.discard(o["name"])
    rid = body.get("id")
    return InferRequest(out, wanted, binary, rid if isinstance(rid, str) else None)


def encode_response(head: dict[str, Any], outputs: list[tuple[str, np.ndarray, str]], binary: set[str]
                    ) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers). `head` holds everything but "outputs"; each output is (name, array, datatype)."""
    tails: list[bytes] = []
    outs = []
    for name, arr, dt in outputs:
        o: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(arr.shape)}
        if name in binary:
            b = _to_bytes(arr, dt)
            o["parameters"] = {"binary_data_size": len(b)}
            tails.append(b)
        else:
            flat = arr.reshape(-1).tolist()
            o["data"] = [x.decode() if isinstance(x, bytes) else x for x in flat] if dt == "BYTES" else flat
        outs.append(o)
    header = orjson.dumps({**head, "outputs": outs})
    if not tails:
        return header, {"content-type": "application/json"}
    return header + b"".join(tails), {"content-type": "application/octet-stream",
                                      HEADER_LENGTH.lower(): str(len(header))}
