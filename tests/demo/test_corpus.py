"""The demo's text pieces: corpus normalisation, the transforms and their inverses, example building."""

from __future__ import annotations

import random
from pathlib import Path

from loramux.demo.adapters import AdapterRecipe, collate, make_examples, split_at_word, styled
from loramux.demo.corpus import (
    TRANSFORMS,
    bigram_share,
    common_bigrams,
    dictionary_share,
    normalize,
    reverse_words,
    rot13,
    stdlib_docstrings,
    uppercase_share,
)
from loramux.demo.tokenizer import train_tokenizer

TEXT = "Return the number of items.\n\nRaise an error if the list is empty."


def test_transforms_are_read_back_by_their_inverse() -> None:
    assert rot13("Return the") == "Erghea gur"
    assert reverse_words("a b c\nd  e") == "c b a\ne d"
    for name, (transform, inverse) in TRANSFORMS.items():
        assert transform(TEXT) != TEXT, name
        assert inverse(transform(TEXT)).lower() == TEXT.lower(), name


def test_normalize_reflows_prose_and_drops_doctests() -> None:
    doc = "Return the sum\nof the items.\n\n>>> add(1, 2)\n3\n\n    indented table\n    stays"
    assert normalize(doc) == "Return the sum of the items.\n\n    indented table\n    stays"
    assert normalize("Short.") is None
    assert normalize("Non-ASCII text é is left out of the corpus.") is None


def test_stdlib_docstrings_reads_a_source_tree(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text(
        '"""Module doc that is long enough."""\ndef f():\n    """Function doc, long enough too."""\n'
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""Test suites are skipped entirely."""\n')
    (tmp_path / "bad.py").write_text("def (:\n")
    assert stdlib_docstrings(root=tmp_path) == ["Module doc that is long enough.", "Function doc, long enough too."]


def test_measures() -> None:
    assert uppercase_share("ABC def") == 0.5 and uppercase_share("123") == 0.0
    assert dictionary_share("the cat", frozenset({"the"})) == 0.5
    bigrams = common_bigrams(["the list of items", "the list"], count=1)
    assert bigrams == frozenset({("the", "list")})
    assert bigram_share("the list", bigrams) == 1.0 and bigram_share("list the", bigrams) == 0.0


def test_examples_are_a_plain_prompt_and_a_styled_continuation() -> None:
    assert split_at_word("Return the  number", 2) == ("Return the", "  number")
    assert split_at_word("Return", 0) == ("", "Return")
    assert styled(" the number of", reverse_words) == " of number the"
    tokenizer = train_tokenizer([TEXT] * 20, vocab_size=300)
    recipe = AdapterRecipe(max_prompt_words=3)
    examples = make_examples([TEXT] * 5, TRANSFORMS["upper"][0], tokenizer, recipe=recipe, rng=random.Random(0))
    for e in examples:
        prompt = tokenizer.decode(e.ids[: e.prompt_len], skip_special_tokens=True)
        continuation = tokenizer.decode(e.ids[e.prompt_len :], skip_special_tokens=True)
        assert e.ids[0] == tokenizer.bos_token_id and e.ids[-1] == tokenizer.eos_token_id
        assert TEXT.startswith(prompt) and len(prompt.split()) <= 3
        assert continuation == continuation.upper() and (prompt + continuation).upper() == TEXT.upper()
    ids, mask, labels = collate(examples[:2], pad_id=tokenizer.pad_token_id)
    assert ids.shape == mask.shape == labels.shape
    assert (labels[0, : examples[0].prompt_len] == -100).all()
    assert (labels[mask == 0] == -100).all()
