"""Splitting long text at sentence boundaries."""

import pytest

from csm.longform import split_sentences


def test_short_sentences_share_a_chunk_up_to_the_limit():
    text = "Hello there. How are you?  I am fine!\nThanks for asking."
    assert split_sentences(text, max_chars=30) == ["Hello there. How are you?", "I am fine! Thanks for asking."]
    assert split_sentences(text) == ["Hello there. How are you? I am fine! Thanks for asking."]


def test_sentence_ends_after_closing_quotes_and_ellipses():
    text = 'He said "stop." Then he left\u2026 Nobody (not even me.) followed.'
    assert split_sentences(text, max_chars=25) == [
        'He said "stop."',
        "Then he left\u2026",
        "Nobody (not even me.)",
        "followed.",
    ]


def test_long_sentences_are_cut_at_clauses_then_spaces():
    clauses = "one two three, four five six; seven eight nine"
    assert split_sentences(clauses, max_chars=16) == ["one two three,", "four five six;", "seven eight nine"]
    words = "alpha beta gamma delta epsilon"
    chunks = split_sentences(words, max_chars=11)
    assert chunks == ["alpha beta", "gamma delta", "epsilon"]
    assert split_sentences("unbreakableword", max_chars=4) == ["unbreakableword"]


def test_every_word_is_kept_in_order():
    text = "A first sentence, with a clause. " * 20 + "And an end without a full stop"
    chunks = split_sentences(text, max_chars=50)
    assert " ".join(chunks).split() == text.split()
    assert all(len(chunk) <= 50 for chunk in chunks)


def test_blank_text_gives_no_chunks_and_bad_limits_are_refused():
    assert split_sentences("  \n ") == []
    with pytest.raises(ValueError, match="max_chars"):
        split_sentences("text", max_chars=0)
