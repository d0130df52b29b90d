"""One spelling per input path (`catdog.io.paths`): local names that are not UTF-8 are written as
readable, distinct UTF-8 text, and their exact bytes come back."""

from __future__ import annotations

import os

import pytest

from catdog.io.paths import escape_local_path, local_path_bytes, normalise_path, unescape_local_path


@pytest.mark.parametrize("raw", [b"/srv/caf\xe9.jpg", b"/srv/a\\xe9.jpg", b"/srv/a\\\\b.jpg", b"/srv/plain.jpg",
                                 "/srv/猫.jpg".encode(), b"/srv/\xff\xfe/x.png"])
def test_every_local_name_has_one_readable_spelling_with_its_bytes_back(raw):
    spelled = escape_local_path(os.fsdecode(raw))
    spelled.encode("utf-8")  # valid UTF-8: Arrow, Parquet and every reader take it
    assert local_path_bytes(spelled) == raw
    assert unescape_local_path(spelled) == os.fsdecode(raw)
    assert normalise_path(spelled) == spelled  # listing and manifests agree on the spelling


def test_a_latin1_name_and_a_name_that_looks_escaped_stay_two_paths():
    latin1 = escape_local_path(os.fsdecode(b"/srv/caf\xe9.jpg"))
    literal = escape_local_path("/srv/caf\\xe9.jpg")  # a real backslash in a (valid UTF-8) name
    assert latin1 == "/srv/caf\\xe9.jpg" and literal == "/srv/caf\\\\xe9.jpg" and latin1 != literal
