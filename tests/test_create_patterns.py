"""The allow/ignore glob dialect of manifest creation (spec §2.3 and its §7.1 oracles)."""

from __future__ import annotations

import pytest

from ttfs.create.patterns import filter_paths, glob_match, keep, show_patterns


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        # spec §7.1 oracles (create/filter.rs)
        ("*.txt", "file.txt", True),
        ("*.txt", "file.json", False),
        ("*", "anything/at/all.bin", True),
        ("prefix*", "prefix_file.txt", True),
        ("prefix*", "other_file.txt", False),
        ("*.lock", "tokenizer_config.json.lock", True),
        ("*tokenizer_config.json", "rank-0/checkpoint-24/tokenizer_config.json", True),
        # `*` crosses `/`
        ("*.json", "a/b/config.json", True),
        ("original*", "original/consolidated.00.pth", True),
        # no `*`: the whole path must be equal
        ("config.json", "config.json", True),
        ("config.json", "sub/config.json", False),
        # `?` and `[...]` are literal; `**` is just `*` twice
        ("file?.txt", "file1.txt", False),
        ("file?.txt", "file?.txt", True),
        ("[ab].bin", "a.bin", False),
        ("[ab].bin", "[ab].bin", True),
        ("**/*.bin", "x/y.bin", True),
        ("**.bin", "y.bin", True),
        # middle pieces in order, leftmost first; prefix and suffix may not overlap
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "acb", False),
        ("ab*ba", "aba", False),
        ("*cache*", "model/.cache/x", True),
        ("*.metadata", "x.metadata", True),
        # case-sensitive
        ("*.JSON", "config.json", False),
        ("", "", True),
        ("", "x", False),
        ("*", "", True),
    ],
)
def test_glob_dialect(pattern: str, path: str, expected: bool) -> None:
    assert glob_match(pattern, path) is expected


def test_oracle_allow_and_ignore() -> None:
    allow, ignore = ["*.safetensors", "*.json"], ["*.md"]
    assert keep("model.safetensors", allow, ignore)
    assert not keep("README.md", allow, ignore)
    assert not keep("model.txt", allow, ignore)
    assert keep("anything", None, None)


def test_ignore_beats_allow() -> None:
    assert not keep("config.json", ["*.json"], ["config*"])


def test_empty_allow_list_keeps_nothing() -> None:
    assert filter_paths(["a", "b"], [], None) == []
    assert filter_paths(["a", "b"], None, []) == ["a", "b"]


def test_filter_oracles() -> None:
    files = ["model.safetensors", "config.json", "tokenizer.json", "README.md"]
    assert filter_paths(files, ["*.json"], None) == ["config.json", "tokenizer.json"]
    assert filter_paths(files, None, ["*.md", "*.json"]) == ["model.safetensors"]


def test_show_patterns() -> None:
    assert show_patterns(None) == "None"
    assert show_patterns(("*.bin",)) == "['*.bin']"
