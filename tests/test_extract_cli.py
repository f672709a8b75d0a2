"""`inferd extract` end to end on the tiny model: one schema-valid object per document, in order, an error line
for a bad document without stopping the batch, and a one-line error (exit 1) for a bad schema."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema

SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["invoice", "contract", "form"]},
                                           "total": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["kind", "total"], "additionalProperties": False}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferd.cli", "extract", *args], capture_output=True, text=True,
                          timeout=300)


def test_extract_writes_one_line_per_document(tiny_hf, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    docs = []
    for i, text in enumerate(["Invoice 12, total 40 EUR", "Service contract, 2 years", "Form A-38"]):
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text(text)
    docs.insert(1, tmp_path / "missing.txt")
    out = tmp_path / "out.jsonl"
    r = run("--schema", str(schema), "--model", str(tiny_hf), "--dtype", "float32", "--kv-cache-memory", "0.05",
            "--max-tokens", "40", *map(str, docs), "-o", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [ln["file"] for ln in lines] == list(map(str, docs))
    assert "error" in lines[1] and "missing.txt" in lines[1]["error"]
    for ln in lines[:1] + lines[2:]:
        jsonschema.validate(ln["data"], SCHEMA)
    assert "extracted 3/4 documents (1 failed)" in r.stderr and "docs/s" in r.stderr


def test_extract_refuses_a_bad_schema_in_one_line(tiny_hf, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    doc = tmp_path / "d.txt"
    doc.write_text("x")
    r = run("--schema", str(schema), "--model", str(tiny_hf), "--dtype", "float32", "--kv-cache-memory", "0.05",
            str(doc))
    assert r.returncode == 1
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and "uniqueItems" in err[0], r.stderr
