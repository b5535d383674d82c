"""The sampler and stop-string handling, checked against their definitions."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellm.model import _split_stop
from edgellm.runtime.errors import EdgeLLMError
from edgellm.sampling import Sampler, SamplingParams, _top_order


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert Sampler(temperature=0)(logits) == 1


def test_repetition_penalty_changes_greedy_choice():
    logits = np.array([0.0, 3.0, 2.9])
    s = Sampler(temperature=0, repetition_penalty=1.5)
    assert s(logits, history=[1]) == 2  # 3.0 / 1.5 = 2.0 < 2.9
    assert s(logits, history=[0]) == 1


def test_top_k_one_is_greedy_at_any_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50)
    s = Sampler(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=1)
    assert {s(logits) for _ in range(20)} == {int(np.argmax(logits))}


def test_top_p_keeps_smallest_prefix():
    # probabilities 0.5, 0.3, 0.2 at temperature 1: top_p 0.7 keeps the first two only
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    s = Sampler(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0, repetition_penalty=1.0, seed=0)
    seen = {s(logits) for _ in range(300)}
    assert seen == {0, 1}


def test_min_p_cuts_relative_to_top():
    logits = np.log(np.array([0.6, 0.35, 0.05]))
    s = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1, repetition_penalty=1.0, seed=0)
    assert {s(logits) for _ in range(300)} == {0, 1}  # 0.05 < 0.1 * 0.6


def test_sampling_follows_the_distribution():
    p = np.array([0.7, 0.2, 0.1])
    s = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=3)
    counts = np.bincount([s(np.log(p)) for _ in range(4000)], minlength=3) / 4000
    assert np.abs(counts - p).max() < 0.03  # ~4 sigma for n=4000


def test_seed_reproduces():
    logits = np.random.default_rng(1).normal(size=100)
    a, b = Sampler(seed=7, temperature=2.0), Sampler(seed=7, temperature=2.0)
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5},
                                {"min_p": 1.0}, {"top_k": -2}, {"repetition_penalty": 0}])
def test_bad_parameters_are_clear_errors(kw):
    with pytest.raises(EdgeLLMError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_split_stop():
    assert _split_stop("hello wor", ["world"]) == ("hello ", "wor", False)
    assert _split_stop("hello world!", ["world"]) == ("hello ", "", True)
    assert _split_stop("abc", []) == ("abc", "", False)
    assert _split_stop("ab\n", ["\n\n"]) == ("ab", "\n", False)
    assert _split_stop("ab\n", ["\n\n"], final=True) == ("ab\n", "", False)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-4, 4), min_size=1, max_size=200), st.integers(0, 210))
def test_top_k_selection_equals_a_full_stable_sort(values, k):
    # ties at the k-th value are frequent with small integers: the partial selection must
    # still pick the same ids, in the same order, as sorting everything
    logits = np.asarray(values, dtype=np.float64)
    full = np.argsort(-logits, kind="stable")
    np.testing.assert_array_equal(_top_order(logits, k), full[:k] if k else full)
