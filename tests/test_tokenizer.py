"""Tokenizer from tokenizer.json and from GGUF metadata; chat templates; incremental detokenization."""

from __future__ import annotations

import pytest

from inferd.engine.detokenizer import IncrementalDetokenizer
from inferd.errors import InvalidRequestError
from inferd.loader.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_hf) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_hf)


def test_roundtrip_multibyte(tok):
    text = "Café naïve 東京 🙂 done"
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_tokens(tok):
    ids = tok.encode("<|im_start|>user", add_special_tokens=False)
    assert ids[0] == tok.hf.token_to_id("<|im_start|>")


def test_incremental_detokenizer_never_splits_characters(tok):
    text = "東京 🙂 Café"
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, [], True, [], False)
    pieces = []
    for t in ids:
        det.add(t)
        pieces.append(det.take_delta(False))
    det.flush()
    pieces.append(det.take_delta(True))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_chat_template_and_sandbox(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert not no_gen.endswith("assistant\n")
    evil = Tokenizer(tok.hf, bos_token_id=None, eos_token_ids=(), add_bos=False,
                     chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception, match="unsafe|access"):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    raising = Tokenizer(tok.hf, bos_token_id=None, eos_token_ids=(), add_bos=False,
                        chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])


def test_spm_tokenizer_from_gguf_metadata():
    # a small SentencePiece-style vocab: byte fallback tokens plus a few merges
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + \
        ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "ld", "orld", "▁world"]
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0}
    t = Tokenizer.from_gguf_metadata(md)
    ids = t.encode("hello world")
    assert ids[0] == 1  # llama adds BOS
    assert [t.id_to_token(i) for i in ids[1:]] == ["▁hello", "▁world"]
    assert t.decode(ids) == "hello world"
    ids = t.encode("hé")  # é is not in the vocab: byte fallback
    assert t.decode(ids) == "hé"


def test_byte_level_fast_path_equals_full_decode(tok):
    import random

    assert tok.byte_table(True) is not None
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        det = IncrementalDetokenizer(tok, [], True, [], False)
        for t in ids:
            det.add(t)
        det.flush()
        assert det.text == tok.decode(ids)
