"""Engine logprobs -> OpenAI shapes.

The engine gives, per generated token, ``{"token": id, "logprob": x, "top": [(id, logprob), ...]}``.
Chat wants ``logprobs.content[*] = {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}``;
completions want ``logprobs = {tokens, token_logprobs, top_logprobs: [{text: logprob}], text_offset}``.

A token's ``token`` is its text as the tokenizer decodes it alone; ``bytes`` are its exact bytes. For a
byte-level BPE token that ends mid-character the text is U+FFFD but the bytes are still right, because
they are read from the token's byte-level symbols, not re-encoded from the text.
"""

from __future__ import annotations

from functools import lru_cache

from deltaserve.server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from deltaserve.tokenizer import Tokenizer


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode table, inverted (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Per-token text and bytes, cached: the vocabulary is finite and logprobs are on the hot path."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tok.token_text(token_id)
            hit = (text, self._bytes(token_id, text))
            if len(self._cache) < 1 << 20:
                self._cache[token_id] = hit
        return hit

    def _bytes(self, token_id: int, text: str) -> list[int]:
        if token_id in self.tok.special_ids:
            return list(text.encode())
        piece = self.tok.hf.convert_ids_to_tokens(token_id) if token_id < self.tok.vocab_size else None
        table = _byte_decoder()
        if isinstance(piece, str) and piece and all(ch in table for ch in piece):
            return [table[ch] for ch in piece]
        return list(text.encode())


def chat_logprobs(entries: list[dict], texts: TokenTexts) -> ChatLogprobs:
    content = []
    for e in entries:
        token, raw = texts.get(e["token"])
        top = [TopLogprob(token=texts.get(i)[0], logprob=lp, bytes=texts.get(i)[1]) for i, lp in e["top"]]
        content.append(TokenLogprob(token=token, logprob=e["logprob"], bytes=raw, top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(entries: list[dict], texts: TokenTexts, offset: int = 0) -> CompletionLogprobs:
    """``offset``: characters of this choice's text before the first of ``entries`` (for streaming)."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        token = texts.get(e["token"])[0]
        tokens.append(token)
        lps.append(e["logprob"])
        # As vLLM: the k most likely plus the sampled token. Keys are texts, and distinct tokens can share
        # one (byte tokens that read U+FFFD): the more likely keeps the key, the sampled token always does.
        top: dict[str, float] = {}
        for i, lp in e["top"]:
            top.setdefault(texts.get(i)[0], lp)
        top[token] = e["logprob"]
        tops.append(top)
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)
