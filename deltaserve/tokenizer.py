"""The model's HF tokenizer: encoding, chat templates, and fast decoding of id lists.

Decoding goes straight to the ``tokenizers`` backend (the hot path of incremental detokenization);
ids beyond the tokenizer's vocabulary (a model's ``vocab_size`` is often padded past it) decode to
nothing rather than failing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from deltaserve.errors import CheckpointError, InvalidRequestError

logger = logging.getLogger(__name__)


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:
            raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({e})") from e
        self.backend = self.hf.backend_tokenizer
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        self.special_ids = set(self.hf.all_special_ids)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=skip_special_tokens)

    def set_chat_template(self, template: str) -> None:
        """Use ``template`` (Jinja text, see :func:`load_chat_template`) instead of the checkpoint's."""
        self.hf.chat_template = template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template_kwargs: dict[str, Any] | None = None) -> str:
        if not self.hf.chat_template:
            raise InvalidRequestError("this model's tokenizer has no chat template; use the completions API",
                                      "messages")
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               **(chat_template_kwargs or {}))
        except Exception as e:  # jinja errors on malformed messages
            raise InvalidRequestError(f"cannot apply the chat template to these messages: {e}", "messages") from e

    def token_text(self, token_id: int) -> str:
        """A single token as text (for logprobs), special tokens included."""
        return self.decode([token_id], skip_special_tokens=False)


def load_chat_template(value: str) -> str:
    """``--chat-template``: a path to a Jinja file, or the template itself (as vLLM takes it), checked for
    syntax here so that a broken template stops the server at start rather than failing every chat
    request. Raises ConfigError naming the file or the line."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from deltaserve.errors import ConfigError

    looks_inline = any(c in value for c in "{}\n")
    path = Path(value)
    if not looks_inline:
        if not path.is_file():
            raise ConfigError(f"--chat-template {value}: no such file (give a Jinja file, or the template text "
                              "itself, which contains '{{' or '{%')")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--chat-template {value}: cannot read it ({e})") from e
    else:
        text, where = value, "the --chat-template text"
    try:  # transformers renders templates in this environment
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{where}, line {e.lineno}: not a valid Jinja template ({e.message})") from e
    return text
