"""loramux.core.engine.text_stream with a real byte-level BPE tokenizer, trained offline in a fixture."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loramux.core.engine.text_stream import IncrementalDetokenizer, StopStringMatcher, TextStream
from loramux.core.errors import InvalidArgumentError

EOS = "<|endoftext|>"

_CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello again!",
    "Un café au lait, s'il vous plaît. Crème brûlée et pâté à la française.",
    "Die Straße ist groß und weiß. Grüße aus München, Übermaß an Spaß.",
    "中文字符测试。我们在这里写一些中文句子，用来训练分词器。你好世界！",
    "Emoji time 🙂🎉 party 🎉🙂 and more 🚀✨ rockets and sparkles 🙂.",
    "def main():\n    print('hello')\n    return 42\n",
    "Numbers 12345 67890 and symbols #@$%^&*() are here too.",
]
CORPUS = "\n".join(_CORPUS_LINES * 12)  # a few KB

SAMPLES = [
    "plain ascii text, nothing special",
    "Un café au lait et une crème brûlée",
    "Die Straße: Grüße, Spaß, Übermaß",
    "中文字符测试，你好世界",
    "party 🙂🎉 time 🚀✨!",
    "unseen letters: Ωмир ελληνικά ℵ ∑ 𝔘𝔫𝔦 🦀🧪",
    "mixed: café 中文 🙂 straße 🎉 end",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_CORPUS_LINES * 12, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(tokenizer: PreTrainedTokenizerFast, ids: list[int], **kwargs: bool) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detok.push(i) for i in ids] + [detok.flush()]


def _assert_clean(deltas: list[str]) -> None:
    for delta in deltas:
        assert "\ufffd" not in delta, deltas
        delta.encode("utf-8")  # valid text: no lone surrogates


# -------------------------------------------------------------------------------------- detokenizer


def test_fixture_splits_multibyte_characters(tokenizer: PreTrainedTokenizerFast) -> None:
    """The premise of the tests below: some characters span several tokens, each undecodable alone."""
    for char in ["🦀", "Ω", "ℵ"]:
        ids = _ids(tokenizer, char)
        assert len(ids) > 1, char
        assert tokenizer.decode(ids[:1]).endswith("\ufffd")


@pytest.mark.parametrize("text", SAMPLES)
def test_deltas_concatenate_to_full_decode(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = _ids(tokenizer, text)
    deltas = _stream(tokenizer, ids)
    _assert_clean(deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert deltas[-1] == ""  # nothing left for flush when the text ends on a whole character


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_follow_skip_special_tokens(
    tokenizer: PreTrainedTokenizerFast, skip_special_tokens: bool
) -> None:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids = [*_ids(tokenizer, "café 🙂"), eos, *_ids(tokenizer, " 中文"), eos]
    deltas = _stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
    _assert_clean(deltas)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert (EOS in "".join(deltas)) is not skip_special_tokens


class _DecodeOnly:
    """Just ``decode``: the detokenizer's general path."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.calls = 0
        self._tokenizer = tokenizer

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = False) -> str:
        self.calls += 1
        return self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_fast_tokenizers_stream_what_their_decode_streams(
    tokenizer: PreTrainedTokenizerFast, skip_special_tokens: bool
) -> None:
    """A fast tokenizer decodes through its Rust backend directly: deltas equal those of its decode()."""
    assert tokenizer.clean_up_tokenization_spaces is False
    eos = tokenizer.convert_tokens_to_ids(EOS)
    rng = random.Random(7)
    for _ in range(20):
        ids = [rng.choice([*range(len(tokenizer) - 1), eos]) for _ in range(rng.randint(1, 40))]
        general = _DecodeOnly(tokenizer)
        expected = _stream(general, ids, skip_special_tokens=skip_special_tokens)  # type: ignore[arg-type]
        assert general.calls > 0
        assert _stream(tokenizer, ids, skip_special_tokens=skip_special_tokens) == expected


def test_a_tokenizer_that_cleans_up_spaces_decodes_through_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    class CleansUp(_DecodeOnly):
        clean_up_tokenization_spaces = True
        backend_tokenizer = tokenizer.backend_tokenizer  # present, but its decode would skip the clean-up

    wrapped = CleansUp(tokenizer)
    _stream(wrapped, _ids(tokenizer, "hello , world"))  # type: ignore[arg-type]
    assert wrapped.calls > 0


def test_incomplete_character_is_held_until_complete(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = _ids(tokenizer, "a🦀")
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    assert deltas[0] == "a"
    assert all(d == "" for d in deltas[1:-1])  # bytes of the crab, not yet a character
    assert deltas[-1] == "🦀"


def test_flush_releases_a_truncated_character(tokenizer: PreTrainedTokenizerFast) -> None:
    """A stream cut mid-character: flush emits what decode gives (U+FFFD), so the concatenation still holds."""
    ids = _ids(tokenizer, "ok 🦀")[:-1]
    deltas = _stream(tokenizer, ids)
    _assert_clean(deltas[:-1])
    assert deltas[-1].endswith("\ufffd")
    assert "".join(deltas) == tokenizer.decode(ids)


def test_random_token_sequences_concatenate(tokenizer: PreTrainedTokenizerFast) -> None:
    """Arbitrary ids (as a model may emit), invalid byte sequences included: deltas + flush == decode."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


# -------------------------------------------------------------------------------------- stop strings


def _match(deltas: list[str], stops: list[str]) -> tuple[list[str], bool, str]:
    matcher = StopStringMatcher(stops)
    emitted, stopped = [], False
    for delta in deltas:
        text, stopped = matcher.push(delta)
        emitted.append(text)
    return emitted, stopped, matcher.flush()


@pytest.mark.parametrize(
    ("deltas", "stops", "emitted", "stopped", "flushed"),
    [
        (["Hello STOP world"], ["STOP"], ["Hello "], True, ""),
        (["Hel", "lo ST", "OP tail"], ["STOP"], ["Hel", "lo ", ""], True, ""),
        (["S", "T", "O", "P"], ["STOP"], ["", "", "", ""], True, ""),
        (["ab S", "TO", "x more"], ["STOP"], ["ab ", "", "STOx more"], False, ""),  # diverged: released
        (["tail S", "T"], ["STOP"], ["tail ", ""], False, "ST"),  # flush releases the held prefix
        (["aa", "ab"], ["aab"], ["", "a"], True, ""),  # overlapping restart of the stop
        (["x</s", "><|end|>"], ["</s>", "<|end|>"], ["x", ""], True, ""),
        (["one\n\ntwo"], ["\n\n", "two"], ["one"], True, ""),  # earliest stop wins
        (["no stop here"], [], ["no stop here"], False, ""),
        (["done. ", "More"], ["."], ["done", ""], True, ""),
        (["café 🎉", " fin"], ["🎉 f"], ["café ", ""], True, ""),
    ],
)
def test_stop_string_matcher(
    deltas: list[str], stops: list[str], emitted: list[str], stopped: bool, flushed: str
) -> None:
    assert _match(deltas, stops) == (emitted, stopped, flushed)


def test_nothing_is_emitted_after_a_stop() -> None:
    matcher = StopStringMatcher(["END"])
    assert matcher.matched is None
    assert matcher.push("a END b") == ("a ", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""
    assert matcher.stopped and matcher.matched == "END"


@pytest.mark.parametrize(
    ("text", "stops", "matched"),
    [
        ("x ab y", ["b", "ab"], "ab"),  # earliest start wins
        ("x ab y", ["a", "ab"], "ab"),  # same start: the longest
        ("x ab y", ["zz", " y", "b "], "b "),
    ],
)
def test_matched_reports_the_stop_string(text: str, stops: list[str], matched: str) -> None:
    matcher = StopStringMatcher(stops)
    matcher.push(text)
    assert matcher.matched == matched


@pytest.mark.parametrize("stops", [[""], ["ok", ""]])
def test_empty_stop_string_is_rejected(stops: list[str]) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        StopStringMatcher(stops)
    assert info.value.field == "stopping.stop"


def test_stop_matcher_on_random_splits() -> None:
    """Any split of a text gives the text cut before the first stop; no piece holds a stop's start too early."""
    rng = random.Random(1)
    stops = ["abc", "cab!", "🙂x"]  # none a substring of another: earliest start == earliest completion
    alphabet = "abc!🙂x "
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 25)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(0, 6))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        emitted, stopped, flushed = _match(deltas, stops)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[: min(hits)] if hits else text
        assert "".join(emitted) + flushed == expected
        assert stopped is bool(hits)


# ---------------------------------------------------------------------------------------- TextStream


def _run(stream: TextStream, ids: list[int]) -> tuple[list[str], int | None]:
    """Push every id; return the deltas (flush last) and how many ids had been pushed when it stopped."""
    deltas, stopped_at = [], None
    for n, token in enumerate(ids, start=1):
        delta, stopped = stream.push(token)
        deltas.append(delta)
        if stopped and stopped_at is None:
            stopped_at = n
    deltas.append(stream.flush())
    return deltas, stopped_at


def _first_complete(tokenizer: PreTrainedTokenizerFast, ids: list[int], stop: str) -> int:
    """Fewest leading ids whose decoded text contains ``stop``."""
    return next(n for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n]))


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("Hello world, hello again! The end.", "again!"),
        ("Un café au lait, s'il vous plaît.", "é au"),
        ("party 🙂🎉 time 🚀✨!", "🎉 t"),
        ("中文字符测试，你好世界", "你好"),
        ("unseen 🦀🧪 crab and flask", "🧪"),  # stop inside a character split over tokens
        ("stop at the very start", "stop"),
    ],
)
def test_text_stream_stops_across_token_boundaries(tokenizer: PreTrainedTokenizerFast, text: str, stop: str) -> None:
    ids = _ids(tokenizer, text)
    assert not any(stop in tokenizer.decode([i]) for i in ids)  # premise: the stop spans several tokens
    stream = TextStream(tokenizer, stops=[stop])
    deltas, stopped_at = _run(stream, ids)
    _assert_clean(deltas)
    assert "".join(deltas) == stream.text == text[: text.index(stop)]
    assert stopped_at == _first_complete(tokenizer, ids, stop)  # stops on the token that completes it
    assert all(d == "" for d in deltas[stopped_at:])  # nothing past the stop
    assert stream.stopped and stream.matched_stop == stop


@pytest.mark.parametrize(
    ("text", "stops"),
    [
        ("Un café au chocolat", ["café au lait"]),  # partial match, then diverges
        ("Grüße aus München", ["Grüße aus Berlin", "🙂"]),
        ("ends with a partial stop: caf", ["café"]),  # held back until flush
        ("emoji 🎉🎉 party", ["🎉🙂"]),
        ("no stops at all 中文", []),
    ],
)
def test_text_stream_without_stop_emits_everything(
    tokenizer: PreTrainedTokenizerFast, text: str, stops: list[str]
) -> None:
    ids = _ids(tokenizer, text)
    stream = TextStream(tokenizer, stops=stops)
    deltas, stopped_at = _run(stream, ids)
    _assert_clean(deltas)
    assert stopped_at is None and not stream.stopped and stream.matched_stop is None
    assert "".join(deltas) == stream.text == tokenizer.decode(ids) == text


def test_text_stream_holds_partial_stop_until_flush(tokenizer: PreTrainedTokenizerFast) -> None:
    stream = TextStream(tokenizer, stops=["café"])
    deltas = [stream.push(i)[0] for i in _ids(tokenizer, "un caf")]
    assert "".join(deltas) == "un "
    assert stream.flush() == "caf"


def test_text_stream_stop_found_in_flushed_text(tokenizer: PreTrainedTokenizerFast) -> None:
    """The last character completes only at flush (a truncated one decodes to U+FFFD): a stop there still cuts."""
    ids = _ids(tokenizer, "abc 🦀")[:-1]
    stream = TextStream(tokenizer, stops=["\ufffd"])
    deltas, stopped_at = _run(stream, ids)
    assert stopped_at is None
    assert stream.stopped and "".join(deltas) == "abc "
