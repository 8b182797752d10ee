"""Every input the fuzzers kept (``tests/fuzz_corpus/<target>/``: seeds,
inputs that reached new coverage, and each crash input found, named
``crash-*``, after its fix) replayed through its target in
``tools/fuzz/targets.py``, without sanitizers and without atheris: the
C and Python paths agree and nothing raises.  (``tools/fuzz/run`` is the
fuzzer itself; CI runs it briefly on the sanitizer build.)"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "tests", "fuzz_corpus")
sys.path.insert(0, os.path.join(ROOT, "tools", "fuzz"))

import targets  # noqa: E402


def test_every_target_has_a_corpus():
    for name in targets.TARGETS:
        d = os.path.join(CORPUS, name)
        assert os.path.isdir(d) and os.listdir(d), f"no corpus for {name}"
    assert sorted(os.listdir(CORPUS)) == sorted(targets.TARGETS)


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_corpus_replays(name):
    target = targets.TARGETS[name]
    d = os.path.join(CORPUS, name)
    files = sorted(os.listdir(d))
    for fname in files:
        with open(os.path.join(d, fname), "rb") as f:
            data = f.read()
        try:
            target(data)
        except Exception as e:
            raise AssertionError(f"{name}/{fname}: {e!r}"[:2000]) from e


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_seeds_are_valid_inputs(name):
    """The seeds still mean what they say (a format change in a target
    would otherwise leave the corpus exercising nothing)."""
    for data in targets.seeds(name):
        targets.TARGETS[name](data)
