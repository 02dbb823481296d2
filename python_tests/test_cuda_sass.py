"""The machine code of the built extension's CUDA kernels (no GPU needed).

Reads the `_C` shared object with cuobjdump (shipped in triton's wheel, which
torch's CUDA wheels pull in) and checks, for every compiled arch, that the
float16/bfloat16 Kronecker-mixture kernels use tensor-core MMA (HMMA, or
Hopper's HGMMA), that no kron kernel touches local memory (spills), that the
v2 kernels load their fragments with ldmatrix (LDSM) and their tiles with
cp.async (LDGSTS) within the register budget of the CTAs per SM their planners
plan for, and that the v2 factor gradients read shared memory only through
ldmatrix, its transposed operands through ldmatrix.trans.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import moka_ext
from moka_ext import _C

pytestmark = pytest.mark.skipif(
    not moka_ext.build_info()["cuda"], reason="extension built without CUDA kernels"
)

LOW_PRECISION = ("__half", "__nv_bfloat16")
# The kron kernels that do the matrix products (the gradient reduction, also a
# kron kernel, only adds).
MMA_KERNELS = ("kron_mix_fused_fwd_kernel", "kron_mix_fused_fwd_v2_kernel", "kron_mix_grad_factors_kernel",
               "kron_mix_grad_factors_v2_kernel", "kron_mix_indexed_fwd_kernel")
# The v2 kernels: ldmatrix fragments, cp.async tiles, and the CTAs per SM
# (of 256 threads) their planner launches: one persistent CTA per SM.
V2_KERNELS = {"kron_mix_fused_fwd_v2_kernel": {"threads": 256, "ctas_per_sm": 1},
              "kron_mix_grad_factors_v2_kernel": {"threads": 256, "ctas_per_sm": 1}}
REGS_PER_SM = 65536


def cuobjdump() -> str:
    spec = importlib.util.find_spec("triton")
    candidates = []
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "cuobjdump")
    if shutil.which("cuobjdump"):
        candidates.append(Path(shutil.which("cuobjdump")))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    pytest.fail(f"cuobjdump not found (looked at {[str(c) for c in candidates]}); install triton")


def dump(flag: str) -> str:
    return subprocess.run(
        [cuobjdump(), flag, _C.__file__], check=True, capture_output=True, text=True
    ).stdout


def split_by_arch_and_function(text: str, header: str) -> dict[tuple[str, str], str]:
    """{(arch, mangled kernel name): text of that kernel's section}."""
    out: dict[tuple[str, str], str] = {}
    arch, name, body = None, None, []
    for line in text.splitlines():
        m_arch = re.match(r"\s*arch = (sm_\w+)", line)
        m_fn = re.match(header, line)
        if m_arch or m_fn:
            if name is not None:
                out[(arch, name)] = out.get((arch, name), "") + "\n".join(body)
            name, body = None, []
            if m_arch:
                arch = m_arch.group(1)
            else:
                name = m_fn.group(1)
            continue
        body.append(line)
    if name is not None:
        out[(arch, name)] = out.get((arch, name), "") + "\n".join(body)
    return out


def built_archs() -> set[str]:
    archs = moka_ext.build_info()["cuda_archs"]
    return {"sm_" + a.strip().replace(".", "").replace("+PTX", "") for a in archs.split(";") if a.strip()}


@pytest.fixture(scope="module")
def sass():
    return split_by_arch_and_function(dump("--dump-sass"), r"\s*Function : (\S+)")


@pytest.fixture(scope="module")
def resources():
    return split_by_arch_and_function(dump("--dump-resource-usage"), r"\s*Function (\S+):")


def kron_kernels(table):
    return {k: v for k, v in table.items() if "kron" in k[1]}


def test_every_arch_has_the_low_precision_mma_kernels(sass):
    found = {(arch, k, t) for (arch, name) in sass for k in MMA_KERNELS for t in LOW_PRECISION
             if k in name and t in name}
    for arch in built_archs():
        for k in MMA_KERNELS:
            for t in LOW_PRECISION:
                assert (arch, k, t) in found, (
                    f"no {k}<{t}> compiled for {arch}; kron kernels: {sorted(kron_kernels(sass))}")


def test_low_precision_kron_kernels_use_tensor_cores(sass):
    checked = 0
    for (arch, name), body in sass.items():
        if not any(k in name for k in MMA_KERNELS) or not any(t in name for t in LOW_PRECISION):
            continue
        assert re.search(r"\bH(G)?MMA\b", body), f"{name} ({arch}) has no HMMA/HGMMA instruction"
        checked += 1
    assert checked >= 2 * len(MMA_KERNELS) * len(built_archs())


def test_kron_kernels_use_no_local_memory(resources):
    kernels = kron_kernels(resources)
    assert kernels, "no kron kernel in the resource usage dump"
    for (arch, name), body in kernels.items():
        m = re.search(r"LOCAL:(\d+)", body)
        assert m, f"no LOCAL entry for {name} ({arch}): {body!r}"
        assert int(m.group(1)) == 0, f"{name} ({arch}) uses {m.group(1)} bytes of local memory (spills)"
        m = re.search(r"STACK:(\d+)", body)
        assert m is None or int(m.group(1)) == 0, f"{name} ({arch}) has a stack frame: {body.strip()}"


def test_kernel_names_say_what_they_are(sass):
    for (_, name) in sass:
        assert "kron" in name or "gate_softmax" in name, f"unexpected kernel name {name}"


def test_v2_kernels_use_ldmatrix_and_cp_async(sass):
    checked = 0
    for (arch, name), body in sass.items():
        if not any(k in name for k in V2_KERNELS) or not any(t in name for t in LOW_PRECISION):
            continue
        assert re.search(r"\bLDSM\.16\.M88\.(2|4)\b", body), f"{name} ({arch}) has no ldmatrix (LDSM)"
        assert re.search(r"\bLDGSTS\b", body), f"{name} ({arch}) has no cp.async (LDGSTS)"
        assert re.search(r"\bLDGDEPBAR\b", body) and re.search(r"\bDEPBAR\b", body), (
            f"{name} ({arch}): cp.async groups are not committed and waited for")
        checked += 1
    assert checked == len(V2_KERNELS) * len(LOW_PRECISION) * len(built_archs())


def test_v2_kernels_fit_the_planned_ctas_per_sm(resources):
    checked = 0
    for (arch, name), body in resources.items():
        plan = next((v for k, v in V2_KERNELS.items() if k in name), None)
        if plan is None:
            continue
        regs = int(re.search(r"REG:(\d+)", body).group(1))
        budget = min(255, REGS_PER_SM // (plan["threads"] * plan["ctas_per_sm"]))
        assert regs <= budget, f"{name} ({arch}) uses {regs} registers, budget {budget}"
        checked += 1
    assert checked == len(V2_KERNELS) * len(LOW_PRECISION) * len(built_archs())


def shared_loads(body: str) -> set[str]:
    """The shared-memory load instructions a kernel executes (nvcc pads code
    with never-executed `@!PT LDS RZ, [RZ]`, which are left out)."""
    ops = set()
    for line in body.splitlines():
        if re.search(r"@!PT\s+LDS\s+RZ", line):
            continue
        m = re.search(r"\b(LDSM\.[\w.]+|LDS(\.[\w]+)*)\b", line)
        if m:
            ops.add(m.group(1))
    return ops


def test_v2_gradient_reads_shared_memory_only_through_ldmatrix(sass):
    # v1 loads its fragments with 32-bit LDS and its transposed operands with
    # scalar 2-byte loads; v2 takes every fragment by ldmatrix, the k-major
    # operands (dY^T, A_k, B_k^T, X_t as the second product's B) by .trans.
    checked = 0
    for (arch, name), body in sass.items():
        if "kron_mix_grad_factors_v2_kernel" not in name:
            continue
        ops = shared_loads(body)
        assert any(o.startswith("LDSM.16.MT88") for o in ops), f"{name} ({arch}): no ldmatrix.trans in {ops}"
        assert all(o.startswith("LDSM") for o in ops), f"{name} ({arch}) has non-ldmatrix shared loads: {ops}"
        checked += 1
    assert checked == len(LOW_PRECISION) * len(built_archs())
