"""MoKAConfig validation, per-module resolution and the "auto" factor-shape choice."""
import itertools
import json

import pytest
import torch

from moka_ext import MoKAConfig, apply_moka
from moka_ext.config import LLAMA_TARGET_MODULES
from moka_ext.shapes import choose_shapes, default_budget, shape_cost

# Every hidden / intermediate / kv dimension of LLaMA(-2, -3) and SmolLM2.
LLAMA_DIMS = [4096, 11008, 14336, 1024, 576, 1536, 192]


def test_defaults_target_llama_projections():
    c = MoKAConfig()
    assert c.r == 4 and c.variant == "moka" and c.gating and c.shapes == "auto"
    assert c.target_modules == LLAMA_TARGET_MODULES
    assert c.init == "zero_b"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r must be an int >= 1"),
        ({"r": 2.5}, "r must be an int >= 1"),
        ({"variant": "lokr"}, "variant must be one of"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"init": "kaiming"}, "init must be one of"),
        ({"variant": "mokas", "init": "zero_a"}, "impossible for variant='mokas'"),
        ({"r": 2, "shapes": [(8, 8, 8, 8)]}, "shapes lists 1 components but r=2"),
        ({"r": 1, "shapes": [(8, 8, 8)]}, r"expected 4 positive ints"),
        ({"r": 1, "shapes": "best"}, "must be 'auto'"),
        ({"r": 1, "variant": "mokas", "shapes": [(2, 4, 32, 16)]}, "square identity factors"),
        ({"overrides": {"mlp": {"rank": 3}}}, "unknown fields"),
        ({"overrides": {"(": {"r": 3}}}, "not a valid regex"),
        ({"overrides": {"mlp": {"r": 0}}}, r"overrides\['mlp'\]: r must be"),
        ({"budget": 0}, "budget must be None or an int >= 1"),
        ({"target_modules": []}, "target_modules must name at least one module"),
    ],
)
def test_invalid_settings_fail_at_config_time(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoKAConfig(**kwargs)


def test_shape_that_does_not_factor_fails_at_apply_time_naming_the_module():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(64, 32))
    cfg = MoKAConfig(r=1, shapes=[(4, 4, 4, 16)], target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"'q_proj' \(32 x 64\).*does not factor a 32 x 64 layer"):
        apply_moka(model, cfg)
    assert isinstance(model.q_proj, torch.nn.Linear)  # untouched


def _valid(shapes, out_f, in_f, r, variant="moka"):
    assert len(shapes) == r
    for ma, na, mb, nb in shapes:
        assert ma * mb == out_f and na * nb == in_f
        if variant == "mokas":
            assert ma == na


@pytest.mark.parametrize("out_f, in_f, r, distinct", [(2, 20, 4, 4), (13, 7, 4, 4), (7, 64, 2, 2), (13, 7, 6, 4)])
def test_auto_falls_back_to_the_best_valid_factorization_for_small_or_prime_layers(out_f, in_f, r, distinct):
    # A 20 -> 2 head and a 7 -> 13 layer have no shape with every dim >= 2: they get
    # 1 x n factors (distinct while there are enough, then repeats), with a warning.
    with pytest.warns(UserWarning, match=rf"a {out_f} x {in_f} layer .*best valid factorization"):
        shapes = choose_shapes(out_f, in_f, r)
    _valid(shapes, out_f, in_f, r)
    assert len(set(shapes)) == distinct
    # The best rank first: a full-rank component when one exists within reach.
    assert max(min(s[0], s[1]) * min(s[2], s[3]) for s in shapes) >= min(out_f, in_f) // 2


def test_auto_mokas_falls_back_to_k_1_when_no_block_size_divides():
    with pytest.warns(UserWarning, match="best valid factorization"):
        shapes = choose_shapes(13, 7, 2, variant="mokas")
    _valid(shapes, 13, 7, 2, "mokas")
    assert shapes[0] == (1, 1, 13, 7)


@pytest.mark.parametrize("variant", ["moka", "mokas"])
def test_auto_shapes_for_every_llama_dimension_pair(variant):
    r = 4
    for out_f, in_f in itertools.product(LLAMA_DIMS, LLAMA_DIMS):
        shapes = choose_shapes(out_f, in_f, r, variant)
        assert len(shapes) == r and len(set(shapes)) == r, (out_f, in_f, shapes)
        for ma, na, mb, nb in shapes:
            assert ma * mb == out_f and na * nb == in_f
            assert min(ma, na, mb, nb) >= 2, "degenerate 1 x n factor"
            if variant == "mokas":
                assert ma == na
        if variant == "moka":
            assert sum(shape_cost(s) for s in shapes) <= default_budget(out_f, in_f, r)
            # Diverse: the components look at the weight through different A and B shapes.
            assert len({s[:2] for s in shapes}) == r and len({s[2:] for s in shapes}) == r


def test_auto_respects_an_explicit_budget():
    tight = choose_shapes(4096, 4096, 2, budget=2 * 8192)
    assert all(shape_cost(s) <= 8192 for s in tight)
    # Nothing fits: the cheapest valid shapes, with a warning naming the budget.
    with pytest.warns(UserWarning, match="budget=1000"):
        over = choose_shapes(4096, 4096, 2, budget=1000)
    _valid(over, 4096, 4096, 2)
    with pytest.warns(UserWarning, match="budget=10"):
        _valid(choose_shapes(4096, 4096, 2, variant="mokas", budget=10), 4096, 4096, 2, "mokas")


def test_auto_balanced_first_for_square_4096():
    assert choose_shapes(4096, 4096, 1) == [(64, 64, 64, 64)]


def test_overrides_and_shapes_per_pattern_resolve_by_regex():
    c = MoKAConfig(
        r=2,
        shapes={r"self_attn\.q_proj": [(8, 8, 8, 8), (4, 8, 16, 8)]},
        overrides={r"\.mlp\.": {"r": 3, "variant": "mokas"}, r"down_proj": {"scale": 0.5}},
    )
    q = c.resolve("model.layers.0.self_attn.q_proj")
    assert q.r == 2 and q.shapes == [(8, 8, 8, 8), (4, 8, 16, 8)] and q.variant == "moka"
    k = c.resolve("model.layers.0.self_attn.k_proj")
    assert k.shapes == "auto"
    d = c.resolve("model.layers.1.mlp.down_proj")
    assert d.r == 3 and d.variant == "mokas" and d.scale == 0.5
    assert c.resolve("model.layers.1.mlp.up_proj").scale == 1.0


def test_config_json_round_trip():
    c = MoKAConfig(r=2, shapes=[(8, 8, 8, 8), (4, 8, 16, 8)], overrides={"mlp": {"r": 1, "shapes": "auto"}},
                   layers_to_transform=[0])
    again = MoKAConfig(**json.loads(json.dumps(c.moka_dict())))
    assert again.moka_dict() == c.moka_dict()
    assert again.shapes == [(8, 8, 8, 8), (4, 8, 16, 8)]


def test_auto_shapes_property_any_dims():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(out_f=st.integers(2, 5000), in_f=st.integers(2, 5000), r=st.integers(1, 6),
                      variant=st.sampled_from(["moka", "mokas"]))
    def check(out_f, in_f, r, variant):
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shapes = choose_shapes(out_f, in_f, r, variant)
        _valid(shapes, out_f, in_f, r, variant)
        if not caught:  # the preferred choice: distinct and non-degenerate
            assert len(set(shapes)) == r
            assert all(min(s) >= 2 for s in shapes)
        else:
            assert "shapes='auto'" in str(caught[0].message) and f"r={r}" in str(caught[0].message)

    check()
