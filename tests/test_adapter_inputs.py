"""load_hooked refuses inputs a new user gets wrong, each with an InterpError that says what to do
(found by a break test: before, these ran with the weights silently ignored or raised bare errors)."""

import pytest

from interp.adapters import AdapterError, UnsupportedOptionError, load_hooked, make_random_adapter
from interp.errors import InterpError


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("ads")
    return {n: str(make_random_adapter("tiny-llama", d / n, r=2, target_modules=["q_proj", "v_proj"], seed=i))
            for i, n in enumerate(("a", "b"))}


@pytest.mark.parametrize("combine", ["none", "uniform", "mixture", "arrow", "task_arithmetic"])
def test_weights_refused_where_the_combine_fixes_its_own(two, combine):
    with pytest.raises(UnsupportedOptionError, match="weights do not apply"):
        load_hooked("tiny-llama", two, combine=combine, weights=[0.2, 0.9])


@pytest.mark.parametrize("kwargs, err, match", [
    ({"combine": "bogus"}, AdapterError, "unknown combine"),
    ({"combine": "weighted"}, AdapterError, "needs weights"),
    ({"combine": "weighted", "weights": [1.0]}, AdapterError, "1 weights for 2 adapters"),
    ({"combine": "svd", "rank": 0}, UnsupportedOptionError, "positive integer"),
    ({"combine": "svd", "rank": 2.5}, UnsupportedOptionError, "positive integer"),
    ({"combine": "svd", "rank": True}, UnsupportedOptionError, "positive integer"),
])
def test_bad_combine_inputs(two, kwargs, err, match):
    with pytest.raises(err, match=match):
        load_hooked("tiny-llama", two, **kwargs)


def test_bad_adapter_collections_and_names(two):
    for bad in ({}, [two["a"]]):
        with pytest.raises(AdapterError, match="non-empty"):
            load_hooked("tiny-llama", bad)
    with pytest.raises(InterpError, match="must match"):
        load_hooked("tiny-llama", {"a.b": two["a"]})
    import interp

    with pytest.raises(AdapterError, match="non-empty"):
        interp.load_hooked("tiny-llama")
