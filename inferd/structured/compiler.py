"""Grammar compilation off the engine thread, with a cache keyed by (kind, spec).

llguidance turns a JSON schema, regex, choice list or Lark/GBNF grammar into a matcher over the model's
vocabulary. Building one can take from under a millisecond to seconds for large schemas, so it runs on a
small thread pool: a server request awaits its compile (or gets a 400 naming what is wrong) before it is
added to the engine, and the running batch never waits. Each request then gets a cheap deep copy of the
compiled matcher, which the sampler asks for masks and the engine advances with the accepted tokens.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from inferd.errors import InvalidRequestError
from inferd.structured.params import StructuredOutputsParams

# compact JSON: no free whitespace between tokens, so a small model cannot wander into newlines forever
JSON_DEFAULTS: dict[str, Any] = {"whitespace_flexible": False}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a core dependency; kept for a clear message on broken installs
        raise InvalidRequestError("structured outputs need the llguidance package (pip install llguidance)") from None
    return llguidance


@dataclass
class CompiledGrammar:
    key: tuple[str, str]
    template: Any  # llguidance.LLMatcher in its start state; copied per request
    compile_s: float

    def matcher(self) -> Any:
        return self.template.deep_copy()


@dataclass
class StructuredStats:
    """Counters the server's metrics drain after each step (plain numbers: no prometheus here)."""

    requests: int = 0
    compile_s: list[float] = field(default_factory=list)
    mask_s: list[float] = field(default_factory=list)  # per step: time to compute and apply the masks
    mask_rows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def drain(self) -> tuple[int, list[float], list[float]]:
        with self.lock:
            out = (self.requests, self.compile_s, self.mask_s)
            self.requests, self.compile_s, self.mask_s = 0, [], []
        return out


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar for a spec (not yet checked against the vocabulary)."""
    llg = _llguidance()
    kind = spec.kind
    try:
        if kind == "json":
            opts = dict(JSON_DEFAULTS, lenient=not spec.strict)
            return llg.LLMatcher.grammar_from_json_schema(spec.json, defaults=opts)
        if kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            return llg.grammar_from("choice", spec.choice)
        return llg.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise InvalidRequestError(f"invalid {kind}: {exc}", param=spec.param) from None


class GrammarCompiler:
    def __init__(self, hf_tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...],
                 max_workers: int = 2, cache_size: int = 512):
        self.vocab_size = vocab_size
        self.stats = StructuredStats()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="inferd-grammar")
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[str, str], Future] = collections.OrderedDict()
        self._cache_size = cache_size
        llg = _llguidance()
        # the tokenizer's token trie takes ~1 s to build: start it now, first compiles wait for it
        self._tok: Future = self._pool.submit(
            lambda: llg.LLTokenizer(hf_tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None))
        self._executor: Any = None

    @property
    def lltokenizer(self) -> Any:
        return self._tok.result()

    @property
    def executor(self) -> Any:
        """llguidance's parallel mask executor (its own native threads, no GIL)."""
        if self._executor is None:
            self._executor = _llguidance().LLExecutor()
        return self._executor

    def _compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        llg = _llguidance()
        t0 = time.perf_counter()
        grammar = grammar_text(spec)
        tok = self.lltokenizer
        is_err, msgs = llg.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if is_err:
            msg = msgs[0].strip() if msgs else "invalid grammar"
            if "Unimplemented keys" in msg:
                msg += " (the schema uses keywords the engine cannot enforce; send strict: false to ignore them)"
            raise InvalidRequestError(f"invalid {spec.kind}: {msg}", param=spec.param)
        m = llg.LLMatcher(tok, grammar, log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"invalid {spec.kind}: {m.get_error()}", param=spec.param)
        dt = time.perf_counter() - t0
        with self.stats.lock:
            self.stats.compile_s.append(dt)
        return CompiledGrammar(spec.key(), m, dt)

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """The compile of `spec` (cached: the same schema compiles once)."""
        key = spec.key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[key] = fut
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return fut

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """Blocking: for the library API and the engine's fallback when a compile was not awaited."""
        return self.submit(spec).result()

    async def compile_async(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        return await asyncio.wrap_future(self.submit(spec))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
