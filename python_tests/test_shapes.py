"""The multiply-add cap of the ``"auto"`` shape choice: ``shape_macs`` and ``lora_macs`` against
multiply-adds counted by torch's flop counter on the reference products, the capped choice
against a brute-force search, and the cap reaching the layers through ``MoKAConfig(flops=...)``."""
import itertools
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moka_ext
from moka_ext import MoKAConfig, apply_moka
from moka_ext.shapes import (choose_shapes, default_budget, default_flops, lora_macs, shape_cost,
                             shape_macs)

SMOLLM2_LAYERS = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def counted_macs(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2  # a matmul's flops are 2 per multiply-add


def counted_component_macs(shape, variant="moka") -> int:
    """One token through one component, both GEMM orders as the CPU kernel may run them; the
    cheaper one counts."""
    ma, na, mb, nb = shape
    X = torch.randn(na, nb, dtype=torch.float64)
    B = torch.randn(mb, nb, dtype=torch.float64)
    if variant == "mokas":  # A is the identity: Y = X B^T on the k blocks
        return counted_macs(lambda: X @ B.T)
    A = torch.randn(ma, na, dtype=torch.float64)
    a_first = counted_macs(lambda: (A @ X) @ B.T)
    b_first = counted_macs(lambda: A @ (X @ B.T))
    assert torch.allclose((A @ X) @ B.T, A @ (X @ B.T))
    return min(a_first, b_first)


def candidate_shapes(out_f, in_f):
    return [(ma, na, out_f // ma, in_f // na) for ma in _divisors(out_f) for na in _divisors(in_f)
            if min(ma, na, out_f // ma, in_f // na) >= 2]


def rank(s):
    return min(s[0], s[1]) * min(s[2], s[3])


def test_shape_macs_equals_the_counted_multiply_adds():
    rng = random.Random(0)
    for out_f, in_f in SMOLLM2_LAYERS + [(64, 96), (4096, 4096)]:
        for s in rng.sample(candidate_shapes(out_f, in_f), 12):
            assert shape_macs(s) == counted_component_macs(s), s
        for k in [k for k in _divisors(out_f) if in_f % k == 0 and k >= 2][:4]:
            s = (k, k, out_f // k, in_f // k)
            assert shape_macs(s, "mokas") == counted_component_macs(s, "mokas"), s


@pytest.mark.parametrize("out_f,in_f", SMOLLM2_LAYERS)
def test_auto_cap_is_lora_r16_counted(out_f, in_f):
    x = torch.randn(1, in_f)
    A, B = torch.randn(16, in_f), torch.randn(out_f, 16)
    assert default_flops(out_f, in_f) == lora_macs(out_f, in_f, 16) == counted_macs(lambda: (x @ A.T) @ B.T)


@pytest.mark.parametrize("out_f,in_f", SMOLLM2_LAYERS + [(4096, 4096), (11008, 4096)])
def test_flops_capped_shapes_are_the_highest_rank_under_the_cap(out_f, in_f):
    r = 4
    cap = default_flops(out_f, in_f)
    shapes = choose_shapes(out_f, in_f, r, flops="auto")
    assert shapes == choose_shapes(out_f, in_f, r, flops=cap)
    counted = [counted_component_macs(s) for s in shapes]
    assert all(c <= cap / r for c in counted) and sum(counted) <= cap
    assert sum(shape_cost(s) for s in shapes) <= default_budget(out_f, in_f, r)
    # Brute force over every factorization: nothing feasible outranks the first pick, and the
    # components' ranks are the top feasible ranks in order (distinct A and B shapes aside).
    feasible = [s for s in candidate_shapes(out_f, in_f)
                if counted_component_macs(s) <= cap / r and shape_cost(s) <= default_budget(out_f, in_f, r) / r]
    assert rank(shapes[0]) == max(rank(s) for s in feasible)
    assert [rank(s) for s in shapes] == sorted((rank(s) for s in shapes), reverse=True)
    # The cap binds on SmolLM2: the uncapped choice costs more and reaches a higher rank.
    uncapped = choose_shapes(out_f, in_f, r)
    assert sum(map(shape_macs, uncapped)) > cap and rank(uncapped[0]) > rank(shapes[0])


def test_flops_cap_too_tight_names_it_and_falls_back():
    """No shape fits a cap of 100 multiply-adds: the fallback warns, naming the cap, and returns
    r valid shapes."""
    for variant, flops in (("moka", 100), ("mokas", 10)):
        with pytest.warns(UserWarning, match=rf"flops={flops}\b.*best valid factorization"):
            shapes = choose_shapes(576, 576, 4, variant=variant, flops=flops)
        assert len(shapes) == 4
        for s in shapes:
            assert s[0] * s[2] == 576 and s[1] * s[3] == 576


@pytest.mark.parametrize("bad", ["lora", 0, -5, 2.5, True])
def test_config_rejects_a_bad_flops(bad):
    with pytest.raises(ValueError, match=r"flops must be None, 'auto' or an int >= 1"):
        MoKAConfig(flops=bad)


def test_flops_reaches_every_layer_and_the_adapter_file(tmp_path):
    model = torch.nn.Sequential()
    for i, (out_f, in_f) in enumerate(SMOLLM2_LAYERS):
        model.add_module(f"proj{i}", torch.nn.Linear(in_f, out_f))
    cfg = MoKAConfig(r=4, flops="auto", target_modules=[f"proj{i}" for i in range(4)], init="random")
    apply_moka(model, cfg)
    for i, (out_f, in_f) in enumerate(SMOLLM2_LAYERS):
        layer = getattr(model, f"proj{i}")
        assert sorted(layer.shapes["default"]) == sorted(choose_shapes(out_f, in_f, 4, flops="auto"))
    moka_ext.save_adapter(model, tmp_path / "a")
    fresh = torch.nn.Sequential()
    for i, (out_f, in_f) in enumerate(SMOLLM2_LAYERS):
        fresh.add_module(f"proj{i}", torch.nn.Linear(in_f, out_f))
    loaded = moka_ext.load_adapter(fresh, tmp_path / "a")
    for i in range(len(SMOLLM2_LAYERS)):
        a, b = getattr(model, f"proj{i}"), getattr(loaded, f"proj{i}")
        assert b.shapes["default"] == a.shapes["default"] and torch.equal(b.delta_weight(), a.delta_weight())
