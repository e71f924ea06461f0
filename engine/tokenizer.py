"""Text <-> token ids for the engine, built on the HF ``tokenizers`` library.

``Tokenizer`` is loaded either from a GGUF file's metadata (matching llama.cpp's
pre-tokenization, so ids agree with llama.cpp) or from a Hugging Face model folder.
``IncrementalDetokenizer`` turns a stream of generated ids into text deltas that never
split a multi-byte UTF-8 character.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

# GGUF ``tokenizer.ggml.token_type`` values (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp ``tokenizer.ggml.pre`` names whose split is the plain GPT-2 regex.
_GPT2_PRE = frozenset({"default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais"})
# Names whose split first isolates every ``\p{N}`` character, then applies the GPT-2 regex.
_DIGIT_SPLIT_PRE = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)

# End-of-turn markers that stop generation whenever the vocabulary has them.
_END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
)

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as decoding context by ``IncrementalDetokenizer`` (as vLLM does).
_PROMPT_CONTEXT_TOKENS = 5


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the engine treats specially, and whether BOS is prepended.

    ``extra_stop_token_ids`` holds further end-of-sequence ids a model declares beyond
    ``eos_token_id`` (e.g. the list in a HF ``generation_config.json``).
    """

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    unk_token_id: int | None = None
    add_bos_token: bool = False
    extra_stop_token_ids: frozenset[int] = frozenset()


class Tokenizer:
    """Encodes text to ids and back, and renders chat templates for one model.

    Wraps a ``tokenizers.Tokenizer`` (the BPE itself runs in Rust) and adds the model
    facts the engine needs: BOS policy, stop tokens and the chat template.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special: SpecialTokens,
        chat_template: str | None = None,
    ) -> None:
        """Wrap ``backend``; ``special`` and ``chat_template`` describe the model."""
        self._backend = backend
        self._special = special
        self._chat_template = chat_template

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """Build the tokenizer a GGUF file describes, pre-tokenizing like llama.cpp.

        Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are
        supported; an unknown ``tokenizer.ggml.pre`` raises ``ValueError``.
        """
        model = _gguf_value(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"unsupported GGUF tokenizer model {model!r}: only byte-level BPE ('gpt2') is supported"
            )
        pre = _gguf_value(reader, "tokenizer.ggml.pre") or "default"
        tokens: list[str] = _gguf_value(reader, "tokenizer.ggml.tokens")
        merges: list[str] = _gguf_value(reader, "tokenizer.ggml.merges") or []
        token_types: list[int] = _gguf_value(reader, "tokenizer.ggml.token_type") or []

        bpe = models.BPE(
            vocab={token: index for index, token in enumerate(tokens)},
            merges=[_split_merge(merge) for merge in merges],
        )
        backend = BackendTokenizer(bpe)
        backend.pre_tokenizer = _gguf_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        # CONTROL tokens are special (dropped by skip_special_tokens); USER_DEFINED ones are
        # plain text that llama.cpp still always matches whole. Both must never be split.
        typed = list(zip(tokens, token_types))
        backend.add_special_tokens(
            [_whole(token, special=True) for token, kind in typed if kind == _TOKEN_TYPE_CONTROL]
        )
        backend.add_tokens(
            [_whole(token, special=False) for token, kind in typed if kind == _TOKEN_TYPE_USER_DEFINED]
        )
        special = SpecialTokens(
            bos_token_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_gguf_value(reader, "tokenizer.ggml.eos_token_id"),
            pad_token_id=_gguf_value(reader, "tokenizer.ggml.padding_token_id"),
            unk_token_id=_gguf_value(reader, "tokenizer.ggml.unknown_token_id"),
            add_bos_token=bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token")),
        )
        return cls(backend, special, _gguf_value(reader, "tokenizer.chat_template"))

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        """Load a HF model folder: ``tokenizer.json`` plus optional config files.

        ``tokenizer_config.json`` supplies the chat template, bos/eos/pad/unk tokens and
        ``add_bos_token`` (inferred from the ``tokenizer.json`` post-processor when
        absent); ``chat_template.jinja`` overrides the config's template;
        ``generation_config.json`` adds its ``eos_token_id`` values as stop tokens.
        """
        folder = Path(path)
        backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        generation_eos = generation.get("eos_token_id")
        generation_eos_ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        bos_id = token_id("bos_token")
        eos_id = token_id("eos_token")
        if eos_id is None and generation_eos_ids:
            eos_id = generation_eos_ids[0]
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        special = SpecialTokens(
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=token_id("pad_token"),
            unk_token_id=token_id("unk_token"),
            add_bos_token=add_bos,
            extra_stop_token_ids=frozenset(generation_eos_ids),
        )
        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            template: str | None = template_file.read_text(encoding="utf-8")
        else:
            template = _config_chat_template(config.get("chat_template"))
        return cls(backend, special, template)

    @property
    def backend(self) -> BackendTokenizer:
        """The wrapped ``tokenizers.Tokenizer``, for callers needing the raw library."""
        return self._backend

    @property
    def special_tokens(self) -> SpecialTokens:
        """The model's special token ids and BOS policy."""
        return self._special

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence id, or None when the model has none."""
        return self._special.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        """End-of-sequence id, or None when the model has none."""
        return self._special.eos_token_id

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS, declared extra EOS ids and known end-of-turn tokens."""
        ids = set(self._special.extra_stop_token_ids)
        if self._special.eos_token_id is not None:
            ids.add(self._special.eos_token_id)
        for token in _END_OF_TURN_TOKENS:
            token_id = self._backend.token_to_id(token)
            if token_id is not None:
                ids.add(token_id)
        return frozenset(ids)

    @property
    def chat_template(self) -> str | None:
        """The model's jinja2 chat template source, or None."""
        return self._chat_template

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of ``token_id`` (byte-level form for BPE vocabularies)."""
        token = self._backend.id_to_token(int(token_id))
        if token is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary of size {self.vocab_size}")
        return token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; BOS is prepended only if requested and the model wants it.

        Special tokens written in the text (e.g. ``<|im_start|>``) become their single id.
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        bos = self._special.bos_token_id
        if add_special_tokens and self._special.add_bos_token and bos is not None:
            return [bos, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid or incomplete UTF-8 shows as U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the model's chat template, as HF transformers does.

        Each message must be a dict with string ``role`` and ``content``. Raises
        ``ValueError`` when a message is malformed or the model has no chat template.
        """
        _validate_messages(messages)
        if self._template is None:
            raise ValueError("this model has no chat template; format the prompt yourself")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(self._special.bos_token_id),
            eos_token=self._token_text(self._special.eos_token_id),
        )

    @cached_property
    def _template(self) -> jinja2.Template | None:
        """The compiled chat template, compiled on first use."""
        if self._chat_template is None:
            return None
        return _jinja_environment().from_string(self._chat_template)

    def _token_text(self, token_id: int | None) -> str:
        """The literal text of a special token, or "" when absent."""
        return "" if token_id is None else self.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Streams the text of one generated sequence, one token at a time.

    Uses the prefix-offset/read-offset technique: each step decodes only the tokens since
    the last emitted boundary and returns the new suffix, so a step costs O(window), not
    O(length). Text ending in an incomplete UTF-8 character is withheld until the
    character completes; ``flush`` releases whatever is left when the sequence ends. The
    deltas of all steps plus ``flush`` concatenate to ``tokenizer.decode(generated_ids)``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        """Start a sequence; the last few ``prompt_ids`` serve as decoding context."""
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = [] if prompt_ids is None else [int(i) for i in prompt_ids[-_PROMPT_CONTEXT_TOKENS:]]
        # A prompt ending mid-character would swallow the generated bytes completing it.
        if self._decode(context).endswith(_REPLACEMENT_CHAR):
            context = []
        self._window = context  # ids from the prefix offset on
        self._read_offset = len(context)  # window index of the first id not yet emitted
        self._prefix_text = self._decode(context)
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._parts)

    def step(self, token_id: int) -> str:
        """Add one generated token and return the newly completed text (maybe "")."""
        self._window.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return withheld text (an incomplete character shows as U+FFFD); call at the end."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        """Emit the window's text beyond the already emitted prefix, if it is complete."""
        full = self._decode(self._window)
        if len(full) <= len(self._prefix_text) or (full.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        delta = full[len(self._prefix_text) :]
        self._window = self._window[self._read_offset :]
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._parts.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        """Decode a window of ids with this sequence's special-token policy."""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)


def _gguf_value(reader: gguf.GGUFReader, key: str) -> Any:
    """The Python value of GGUF field ``key`` (str, number, bool or list), None if absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents() if hasattr(field, "contents") else _decode_field_parts(field)


def _decode_field_parts(field: Any) -> Any:
    """Decode a GGUF ReaderField from its raw parts, for gguf releases without ``contents()``."""
    if field.types[-1] == gguf.GGUFValueType.STRING:
        values = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    else:
        values = [field.parts[i].tolist()[0] for i in field.data]
    return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The HF pre-tokenizer reproducing llama.cpp's split for ``tokenizer.ggml.pre``."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return byte_level
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    supported = ", ".join(sorted(_GPT2_PRE | _DIGIT_SPLIT_PRE))
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {supported})")


def _split_merge(merge: str) -> tuple[str, str]:
    """Split a GGUF merge rule ``"left right"`` into its two halves."""
    left, _, right = merge.partition(" ")
    return left, right


def _whole(token: str, special: bool) -> AddedToken:
    """An added token matched verbatim in raw text."""
    return AddedToken(token, special=special, normalized=False)


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _config_chat_template(value: Any) -> str | None:
    """The default template from a ``tokenizer_config.json`` ``chat_template`` entry.

    The entry is either a string or a list of ``{"name", "template"}`` dicts.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        return named.get("default")
    return None


def _validate_messages(messages: Any) -> None:
    """Raise ValueError unless ``messages`` is a list of {role: str, content: str} dicts."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"message {index} needs a string {key!r}")


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    """A sandboxed jinja2 environment with the globals HF chat templates expect."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.filters["tojson"] = tojson
    return env
