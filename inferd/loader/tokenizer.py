"""Tokenizer (Hugging Face `tokenizers`) from tokenizer.json or GGUF metadata, plus the jinja2 chat template."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from inferd.errors import InvalidRequestError, ModelLoadError
from inferd.loader import chat_templates

log = logging.getLogger(__name__)

# Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre` (as in llama.cpp's llama-vocab.cpp).
_LLAMA3_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def _bpe_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_PAT), "isolated"), byte_level])
    if pre in ("qwen2", "deepseek-llm"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_PAT), "isolated"), byte_level])
    if pre not in ("default", "gpt2", "gpt-2"):
        log.warning("unknown GGUF pre-tokenizer %r: using the GPT-2 split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False)


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Rebuild BPE merges from a SentencePiece vocab: a merge (a, b) exists when a, b and a+b are all tokens;
    it ranks by the score of a+b (higher first), as SentencePiece's BPE does."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[float, int, str, str]] = []
    for merged, idx in vocab.items():
        for cut in range(1, len(merged)):
            a, b = merged[:cut], merged[cut:]
            if a in vocab and b in vocab:
                merges.append((-scores[idx], idx, a, b))
    merges.sort()
    return [(a, b) for _, _, a, b in merges]


def _gemma_vocab_merges(tokens: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Gemma files (as transformers' GGUF loader reads them): tokens of two or more spaces are stored as spaces but
    looked up as "▁▁…", and the merges, absent from the file, rank by the merged token's position in the file (its
    scores do not follow the merge order). Within one merged token: longer left piece first."""
    spelled = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    rank = {t: i for i, t in enumerate(spelled)}  # the last duplicate wins, as in a dict built from the list
    merges: list[tuple[int, int, int, str, str]] = []
    for merged, pos in rank.items():
        for cut in range(1, len(merged)):
            a, b = merged[:cut], merged[cut:]
            if a in vocab and b in vocab:
                merges.append((pos, -len(a), -len(b), a, b))
    merges.sort()
    return vocab, [(a, b) for *_, a, b in merges]


# vocabularies at least this large are cached as tokenizer.json under $INFERD_HOME/tokenizers: rebuilding the
# merges of a 262k SentencePiece vocabulary (Gemma) costs seconds at every start
CACHE_MIN_VOCAB = 65536


def tokenizer_from_gguf(md: dict[str, Any]) -> HFTokenizer:
    tokens: list[str] | None = md.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    if len(tokens) < CACHE_MIN_VOCAB:
        return _build_from_gguf(md, tokens)
    from inferd.loader.hub import models_home

    key = hashlib.sha256(json.dumps(
        [TOKENIZER_BUILD_VERSION, str(md.get("general.architecture")), md.get("tokenizer.ggml.model"),
         md.get("tokenizer.ggml.pre"), md.get("tokenizer.ggml.add_space_prefix"), tokens,
         md.get("tokenizer.ggml.token_type"), md.get("tokenizer.ggml.scores"), md.get("tokenizer.ggml.merges"),
         md.get("tokenizer.ggml.unknown_token_id")]).encode()).hexdigest()[:32]
    path = models_home() / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            return HFTokenizer.from_file(str(path))
        except Exception as exc:  # a damaged cache entry: rebuild it
            log.warning("ignoring tokenizer cache %s (%s)", path, exc)
    tok = _build_from_gguf(md, tokens)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)
    except OSError as exc:  # read-only home: the cache is an optimisation only
        log.warning("no tokenizer cache (%s)", exc)
    return tok


TOKENIZER_BUILD_VERSION = 1  # bump when _build_from_gguf changes what it builds (invalidates cached tokenizers)


def _build_from_gguf(md: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    kind = md.get("tokenizer.ggml.model")
    types: list[int] = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        tok.pre_tokenizer = _bpe_pre_tokenizer(str(md.get("tokenizer.ggml.pre", "default")))
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = md.get("tokenizer.ggml.unknown_token_id", 0)
        if str(md.get("general.architecture", "")).startswith("gemma"):
            vocab, merges = _gemma_vocab_merges(tokens)
        else:
            merges = _spm_merges(tokens, scores)
        tok = HFTokenizer(
            models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk], byte_fallback=True, fuse_unk=True)
        )
        prefix = md.get("tokenizer.ggml.add_space_prefix", True)
        tok.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
        )
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if prefix else [])
        )
    else:
        raise ModelLoadError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    # control tokens are special (skipped when decoding with skip_special_tokens); user-defined ones (Gemma's "\n",
    # "<b>", ...) are matched whole but are text, as transformers' and llama.cpp's GGUF tokenizers treat them
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL and t and t in vocab]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED and t and t in vocab]  # (not respelled)
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _raise_exception(message: str) -> None:
    raise InvalidRequestError(f"chat template error: {message}")


class Tokenizer:
    """Encode/decode plus chat templating. `add_bos` says whether encode() prepends BOS itself."""

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool,
        chat_template: str | None,
    ):
        self.hf = hf
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._template = None
        self._byte_tables: dict[bool, list[bytes]] = {}
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.all_special_ids = {
            i for i, t in hf.get_added_tokens_decoder().items() if t.special
        }

    def byte_table(self, skip_special_tokens: bool) -> list[bytes] | None:
        """Bytes of every token id for byte-level BPE tokenizers (None for others): lets the detokenizer
        stream text with an incremental UTF-8 decoder instead of re-decoding a window per token."""
        if not isinstance(self.hf.decoder, decoders.ByteLevel):
            return None
        key = bool(skip_special_tokens)
        if key not in self._byte_tables:
            byte_of = {c: b for b, c in _bytes_to_unicode().items()}
            added = self.hf.get_added_tokens_decoder()
            table: list[bytes] = []
            for i in range(self.vocab_size):
                if i in added:
                    tok = added[i]
                    table.append(b"" if (tok.special and skip_special_tokens) else tok.content.encode("utf-8"))
                    continue
                piece = self.hf.id_to_token(i) or ""
                table.append(bytes(byte_of.get(c, 32) for c in piece))
            self._byte_tables[key] = table
        return self._byte_tables[key]

    @property
    def bos_token(self) -> str:
        return self.hf.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.hf.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self.hf.id_to_token(i) or ""

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template; use a completion prompt instead")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **kwargs,
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    # ---- constructors -------------------------------------------------------------------------
    @staticmethod
    def from_gguf_metadata(md: dict[str, Any]) -> Tokenizer:
        eos = md.get("tokenizer.ggml.eos_token_id")
        eot = md.get("tokenizer.ggml.eot_token_id")
        return Tokenizer(
            tokenizer_from_gguf(md),
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None)),
            add_bos=bool(md.get("tokenizer.ggml.add_bos_token", md.get("tokenizer.ggml.model") == "llama")),
            chat_template=md.get("tokenizer.chat_template")
            or chat_templates.BY_ARCHITECTURE.get(str(md.get("general.architecture"))),
        )

    @staticmethod
    def from_hf_dir(model_dir: str | Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir}: no tokenizer.json")
        hf = HFTokenizer.from_file(str(path))
        tc: dict[str, Any] = {}
        if (model_dir / "tokenizer_config.json").is_file():
            tc = json.loads((model_dir / "tokenizer_config.json").read_text())

        def tok_id(key: str) -> int | None:
            v = tc.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return hf.token_to_id(v) if isinstance(v, str) else None

        template = tc.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (model_dir / "chat_template.jinja").is_file():
            template = (model_dir / "chat_template.jinja").read_text()
        if template is None and (model_dir / "chat_template.json").is_file():  # a multimodal processor's file
            template = json.loads((model_dir / "chat_template.json").read_text()).get("chat_template")
        eos = tok_id("eos_token")
        eos_ids = tuple(dict.fromkeys([*eos_token_ids, *([eos] if eos is not None else [])]))
        # tokenizer.json's post-processor already adds BOS when the model wants it
        return Tokenizer(hf, bos_token_id=tok_id("bos_token"), eos_token_ids=eos_ids, add_bos=False,
                         chat_template=template)
