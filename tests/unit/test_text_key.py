"""``router.gate.text_key``: one label or query written two ways, as a reader (and the tokenizer) sees it."""

from __future__ import annotations

from router.gate import respelled, spelled_alike, text_key


def test_invisible_characters_do_not_make_another_label() -> None:
    """A zero-width space, a byte-order mark or a soft hyphen left in a label by an export is invisible in a report,
    and the tokenizer drops it: "music\\u200b" beside "music" was learned and scored as a class of its own, and test
    queries labelled "books\\ufeff" were scored as out of scope, with no warning."""
    names = ["music", "music\u200b", "mu\u00adsic", "\ufeffmusic", "Music", "books"]
    assert spelled_alike(names) == [["music", "music\u200b", "mu\u00adsic", "\ufeffmusic", "Music"]]
    assert respelled(["books\ufeff", "jazz"], ["books", "music"]) == {"books\ufeff": "books"}


def test_the_key_keeps_what_is_seen() -> None:
    assert text_key("  Stra\u00dfe\u00a0 Caf\u0065\u0301\t") == "strasse café"
    assert text_key("a\u200bb") == "ab" and text_key("a\u2028b") == "a b"  # a line separator is a space
    assert text_key("\U0001f600 ok") == "\U0001f600 ok"  # an emoji is seen
