"""Runs the CUDA kernels of csrc/cuda under the SIMT simulator and checks them.

Owns the simulation build (csrc/cuda/*.cu compiled as host C++ with g++,
AddressSanitizer and UBSan, against csrc/cuda/sim/), the harness protocol
(raw input files in, raw output files out, see csrc/cuda/sim/harness.cpp) and
the comparison with moka_ext.reference computed in float64 from the same
rounded inputs. test_cuda_sim.py uses it; a kernel author runs one case by hand:

    python python_tests/cuda_sim.py fwd --dtype bf16 --tokens 37 --groups 3:5:7:3:9
    python python_tests/cuda_sim.py grad --dtype f16 --tokens 9 --groups 2:16:16:16:16 --seed 2
    python python_tests/cuda_sim.py dx --dtype bf16 --tokens 5 --groups 1:24:24:24:24 --offset 1
    python python_tests/cuda_sim.py fwd --impl v1 --dtype bf16 --tokens 37 --groups 3:5:7:3:9

which prints the launches (grid, block, shared memory) and, per output, the
first difference (token, row, column, expected, got) or that it matches;
`python python_tests/cuda_sim.py build` only builds (make sim).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
SIM_DIR = CUDA_DIR / "sim"
BUILD_DIR = ROOT / "build" / "cuda_sim"

FLAGS = [
    "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer",
    # The kernels reinterpret 16-bit tiles as 32/128-bit words, as CUDA allows.
    "-fno-strict-aliasing",
    "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
    "-DMOKA_CUDA_SIM", f"-I{SIM_DIR / 'include'}",
]
# UBSan's alignment check is CUDA's misaligned-address fault; leaks are real.
RUN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1:exitcode=86",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=87",
}

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}
NAMES = {v: k for k, v in DTYPES.items()}


def _cxx() -> str:
    return os.environ.get("CXX", "g++")


def _inputs() -> list[Path]:
    files = sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh")) + [ROOT / "csrc" / "kron_mix.h"]
    return files + sorted(p for p in SIM_DIR.rglob("*") if p.is_file())


def _compile(out: Path, sources: list[Path], flags: list[str]) -> None:
    """Compiles each source to an object in parallel, then links `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    procs, objs = [], []
    for src in sources:
        obj = out.parent / (src.name + ".o")
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        cmd = [_cxx(), *flags, *lang, "-c", str(src), "-o", str(obj)]
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        objs.append(obj)
    errors = []
    for cmd, p in procs:
        log, _ = p.communicate()
        if p.returncode != 0:
            errors.append(f"$ {' '.join(cmd)}\n{log}")
    if errors:
        raise RuntimeError("simulation build failed:\n" + "\n".join(errors))
    tmp = out.with_suffix(".tmp")
    subprocess.run([_cxx(), *flags, *map(str, objs), "-o", str(tmp)], check=True)
    tmp.replace(out)


def _key(files: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256()
    h.update(" ".join([_cxx(), *flags]).encode())
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build() -> Path:
    """The harness binary for the current sources (built once per source state)."""
    out = BUILD_DIR / _key(_inputs(), FLAGS) / "moka_sim"
    if not out.exists():
        sources = sorted(CUDA_DIR.glob("*.cu")) + [SIM_DIR / "simt.cpp", SIM_DIR / "harness.cpp"]
        _compile(out, sources, FLAGS)
    return out


def cutlass_include() -> Optional[Path]:
    """CUTLASS/CuTe headers from the nvidia-cutlass wheel, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        inc = Path(loc) / "source" / "include"
        if (inc / "cute").is_dir():
            return inc
    return None


def cuda_include_flags() -> list[str]:
    """The toolkit's own include flags (CuTe needs the real CUDA headers and
    CCCL), as nvcc reports them; nvcc on PATH may be a wrapper script."""
    try:
        proc = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("nvcc not found: the CuTe check compiles against the CUDA toolkit's headers") from None
    flags = []
    for line in (proc.stdout + proc.stderr).splitlines():
        for var in ("INCLUDES=", "SYSTEM_INCLUDES="):
            if line.startswith("#$ " + var):
                words = line[len("#$ " + var):].replace('"', " ").split()
                flags += [f"-I{w[2:]}" if w.startswith("-I") else w for w in words if w != "-isystem"]
    return [f if f.startswith("-I") else f"-I{f}" for f in flags]


def build_cute_check() -> Path:
    """The fragment-table check against CuTe's MMA traits (csrc/cuda/sim/cute_check.cpp)."""
    inc = cutlass_include()
    if inc is None:
        raise RuntimeError("nvidia-cutlass is not installed (pip install -r requirements.txt)")
    flags = ["-std=c++17", "-Wno-deprecated-declarations", f"-I{inc}", *cuda_include_flags()]
    out = BUILD_DIR / _key(_inputs(), flags) / "cute_check"
    if not out.exists():
        _compile(out, [SIM_DIR / "cute_check.cpp"], flags)
    return out


# ------------------------------------------------------------------ cases


Group = tuple[int, int, int, int, int]  # (r, ma, na, mb, nb)


@dataclasses.dataclass
class Case:
    """One call of a kernel entry point, with the layout of its buffers."""

    op: str  # "fwd" (y = [base +] mix(x)), "dx" (the forward on dY and the transposed factors), "grad",
    # "indexed" (kron_mix_indexed: tokens = len(row_adapter) * row_tokens)
    dtype: torch.dtype
    tokens: int
    groups: list[Group]
    base: bool = False
    x_stride: Optional[int] = None  # row strides in elements (None: packed)
    y_stride: Optional[int] = None
    offset: int = 0  # elements before every pointer the kernel gets (1: not 16-byte aligned)
    seed: int = 0  # schedule seed of the simulator
    data_seed: int = 0
    arch: str = "sm_90"
    impl: str = "auto"  # the kernel version ("fwd", "dx", "grad"): auto (v2, else v1), v1 or v2
    row_adapter: Optional[list] = None  # "indexed": each row's adapter in [-1, n_adapters)
    n_adapters: int = 1
    row_tokens: int = 1

    @property
    def in_features(self) -> int:
        return self.groups[0][2] * self.groups[0][4]

    @property
    def out_features(self) -> int:
        return self.groups[0][1] * self.groups[0][3]


@dataclasses.dataclass
class Result:
    verdict: str
    result: str
    launches: list[str]
    stdout: str
    outputs: dict  # name -> float64 tensor (what the kernel wrote)
    expected: dict  # name -> float64 tensor
    bounds: dict  # name -> float64 tensor: sum of |terms| of each output element
    raw: dict  # name -> bytes of the output buffer (for bitwise comparisons)
    schedule: str = ""  # "indexed": the harness's "schedule: tile_tokens=.. tiles=.." line


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(torch.float64)


def make_inputs(case: Case) -> dict:
    """Random float64 inputs, already rounded to the case's dtype, O(1) outputs."""
    g = torch.Generator().manual_seed(case.data_seed)

    def rnd(*shape, scale=1.0):
        return _rounded(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, case.dtype)

    T, n_in, n_out = case.tokens, case.in_features, case.out_features
    n_comp = sum(gr[0] for gr in case.groups)
    lead = (case.n_adapters,) if case.op == "indexed" else ()  # one set of factors and gates per adapter
    d = {
        "x": rnd(T, n_in),
        "A": [rnd(*lead, r, ma, na, scale=na**-0.5) for r, ma, na, _, _ in case.groups],
        "B": [rnd(*lead, r, mb, nb, scale=nb**-0.5) for r, _, _, mb, nb in case.groups],
        "gates": rnd(*lead, n_comp, scale=n_comp**-0.5),
        "gy": rnd(T, n_out),
    }
    if case.base:
        d["base"] = rnd(T, n_out)
    return d


def _bits(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    t = t.to(dtype).contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _write(path: Path, rows: torch.Tensor, dtype, offset: int, stride: Optional[int] = None) -> None:
    """rows (n, w) as the kernel sees them: `offset` leading elements and gaps
    between rows of `stride` filled with NaN, which poisons any read of them."""
    rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 1 else rows.reshape(1, -1)
    n, w = rows.shape
    stride = w if stride is None else stride
    size = offset + (0 if n == 0 else (n - 1) * stride + w)
    buf = torch.full((size,), float("nan"), dtype=torch.float64)
    if n:
        view = buf[offset:].as_strided((n, w), (stride, 1))
        view.copy_(rows)
    path.write_bytes(_bits(buf, dtype))


def _read(path: Path, dtype, offset: int, n: int, w: int, stride: Optional[int] = None) -> tuple:
    raw = path.read_bytes()
    buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).to(torch.float64) if raw else torch.empty(0, dtype=torch.float64)
    stride = w if stride is None else stride
    if n == 0:
        return torch.empty(0, w, dtype=torch.float64), raw
    return buf[offset:].as_strided((n, w), (stride, 1)).clone(), raw


def expected_and_bounds(case: Case, d: dict) -> tuple[dict, dict]:
    """Expected outputs and their bounds (the same map on absolute values), in float64."""
    from moka_ext import reference

    # The factored form of the same math for wide layers, where dW is large.
    mix = reference.kron_mix if case.in_features * case.out_features <= 1 << 20 else reference.kron_mix_factored
    A, B, g, x, gy = d["A"], d["B"], d["gates"], d["x"], d["gy"]
    if case.op == "indexed":
        # A per-row loop of the reference: each row's tokens with its adapter, zero for -1.
        S = case.row_tokens
        y, bound = torch.zeros(x.shape[0], case.out_features, dtype=torch.float64), None
        bound = torch.zeros_like(y)
        for i, a in enumerate(case.row_adapter):
            if a < 0:
                continue
            xi = x[i * S : (i + 1) * S]
            y[i * S : (i + 1) * S] = mix(xi, [t[a] for t in A], [t[a] for t in B], g[a])
            bound[i * S : (i + 1) * S] = mix(xi.abs(), [t[a].abs() for t in A], [t[a].abs() for t in B], g[a].abs())
        return {"y": y}, {"y": bound}
    if case.op == "fwd":
        y = mix(x, A, B, g)
        bound = mix(x.abs(), [a.abs() for a in A], [b.abs() for b in B], g.abs())
        if case.base:
            y, bound = y + d["base"], bound + d["base"].abs()
        return {"y": y}, {"y": bound}
    # Backward: autograd of the reference, and of its absolute-value twin with |dY|.
    def grads(x, A, B, g, gy):
        leaves = [t.clone().requires_grad_() for t in [x, *A, *B, g]]
        n = len(A)
        y = mix(leaves[0], leaves[1 : 1 + n], leaves[1 + n : 1 + 2 * n], leaves[-1])
        return torch.autograd.grad((y * gy).sum(), leaves)

    n = len(A)
    exact = grads(x, A, B, g, gy)
    absg = grads(x.abs(), [a.abs() for a in A], [b.abs() for b in B], g.abs(), gy.abs())
    if case.op == "dx":
        return {"y": exact[0]}, {"y": absg[0]}
    exp, bnd = {}, {}
    for j in range(n):
        exp[f"dA{j}"], bnd[f"dA{j}"] = exact[1 + j], absg[1 + j]
        exp[f"dB{j}"], bnd[f"dB{j}"] = exact[1 + n + j], absg[1 + n + j]
    # dg_k = <A_k, G_A,k>: its bound is the gradient bound with |A|.
    exp["dg"], bnd["dg"] = exact[-1], absg[-1]
    return exp, bnd


def _groups_arg(groups) -> str:
    return ",".join(":".join(str(v) for v in gr) for gr in groups)


def run(case: Case, dry_run: bool = False, verdict_only: bool = False, binary: Optional[Path] = None) -> Result:
    """Writes the inputs, runs the harness, reads the outputs and the reference."""
    binary = binary or build()
    d = make_inputs(case) if not (dry_run or verdict_only) else None
    dt = case.dtype
    off = case.offset
    T = case.tokens
    groups = case.groups
    with tempfile.TemporaryDirectory(prefix="moka_sim_") as tmp:
        tmp = Path(tmp)
        harness_op = case.op if case.op in ("grad", "indexed") else "fwd"
        args = [str(binary), harness_op, "--dir", str(tmp), "--dtype", NAMES[dt], "--tokens", str(T),
                "--offset", str(off), "--seed", str(case.seed), "--arch", case.arch]
        if case.op in ("fwd", "dx", "grad"):
            args += ["--impl", case.impl]
        if case.op == "indexed":
            args += ["--groups", _groups_arg(groups), "--rows", str(len(case.row_adapter)),
                     "--row-tokens", str(case.row_tokens), "--adapters", str(case.n_adapters)]
            if case.x_stride is not None:
                args += ["--x-stride", str(case.x_stride)]
            if case.y_stride is not None:
                args += ["--y-stride", str(case.y_stride)]
        elif case.op == "fwd":
            args += ["--groups", _groups_arg(groups)]
            if case.x_stride is not None:
                args += ["--x-stride", str(case.x_stride)]
            if case.y_stride is not None:
                args += ["--y-stride", str(case.y_stride), "--base-stride", str(case.y_stride)]
            if case.base:
                args += ["--base"]
        elif case.op == "dx":
            # dX = the forward map of (dY, A^T, B^T), as csrc/cuda/ops_cuda.cpp calls it.
            args += ["--groups", _groups_arg([(r, na, ma, nb, mb) for r, ma, na, mb, nb in groups])]
            if case.x_stride is not None:
                args += ["--x-stride", str(case.x_stride)]
            if case.y_stride is not None:
                args += ["--y-stride", str(case.y_stride)]
        else:
            args += ["--groups", _groups_arg(groups)]
            if case.x_stride is not None:
                args += ["--x-stride", str(case.x_stride), "--gy-stride", str(case.x_stride + 3)]
        if dry_run:
            args.append("--dry-run")
        if verdict_only:
            args.append("--verdict-only")
        if not (dry_run or verdict_only):
            if case.op == "indexed":
                (tmp / "row_adapter.bin").write_bytes(
                    torch.tensor(case.row_adapter, dtype=torch.int64).numpy().tobytes())
                _write(tmp / "x.bin", d["x"], dt, off, case.x_stride)
                for j, (a, b) in enumerate(zip(d["A"], d["B"])):
                    _write(tmp / f"A{j}.bin", a.reshape(1, -1), dt, off)
                    _write(tmp / f"B{j}.bin", b.reshape(1, -1), dt, off)
            elif case.op == "fwd":
                _write(tmp / "x.bin", d["x"], dt, off, case.x_stride)
                for j, (a, b) in enumerate(zip(d["A"], d["B"])):
                    _write(tmp / f"A{j}.bin", a.reshape(1, -1), dt, off)
                    _write(tmp / f"B{j}.bin", b.reshape(1, -1), dt, off)
                if case.base:
                    _write(tmp / "base.bin", d["base"], dt, off, case.y_stride)
            elif case.op == "dx":
                _write(tmp / "x.bin", d["gy"], dt, off, case.x_stride)
                for j, (a, b) in enumerate(zip(d["A"], d["B"])):
                    _write(tmp / f"A{j}.bin", a.transpose(1, 2).reshape(1, -1), dt, off)
                    _write(tmp / f"B{j}.bin", b.transpose(1, 2).reshape(1, -1), dt, off)
            else:
                _write(tmp / "x.bin", d["x"], dt, off, case.x_stride)
                gys = None if case.x_stride is None else case.x_stride + 3
                _write(tmp / "gy.bin", d["gy"], dt, off, gys)
                for j, (a, b) in enumerate(zip(d["A"], d["B"])):
                    _write(tmp / f"A{j}.bin", a.reshape(1, -1), dt, off)
                    _write(tmp / f"Bt{j}.bin", b.transpose(1, 2).reshape(1, -1), dt, off)
            _write(tmp / "gates.bin", d["gates"].reshape(1, -1), dt, off)
        env = {**os.environ, **RUN_ENV}
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        out = proc.stdout
        if proc.returncode not in (0, 1) or ("result:" not in out and not verdict_only):
            raise RuntimeError(
                f"moka_sim failed (exit {proc.returncode}): {' '.join(args[1:])}\n{out}\n{proc.stderr[-6000:]}"
            )
        lines = out.splitlines()
        verdict = next((ln[len("verdict: "):] for ln in lines if ln.startswith("verdict: ")), "")
        result = next((ln[len("result: "):] for ln in lines if ln.startswith("result: ")), "")
        launches = [ln for ln in lines if ln.startswith("launch ")]
        schedule = next((ln for ln in lines if ln.startswith("schedule: ")), "")
        outputs, raw = {}, {}
        expected, bounds = {}, {}
        if result == "cudaSuccess" and not dry_run and not (case.op == "indexed" and verdict != "ok"):
            expected, bounds = expected_and_bounds(case, d)
            for name, ref in expected.items():
                if name == "y":
                    n, w = T, ref.shape[1]
                    stride = case.y_stride
                else:
                    n, w, stride = 1, ref.numel(), None
                got, raw[name] = _read(tmp / f"{name}.bin", dt, off, n, w, stride)
                outputs[name] = got.reshape(ref.shape)
    return Result(verdict, result, launches, out, outputs, expected, bounds, raw, schedule)


def tolerance(dtype: torch.dtype) -> float:
    """Allowed error per unit of an element's bound: a few roundings to `dtype`
    (the kernels round the intermediate Z or Q and the output once each)."""
    return 2 * torch.finfo(dtype).eps


def first_difference(case: Case, res: Result) -> Optional[str]:
    """None if every output is within tolerance, else where the first one is not."""
    tol = tolerance(case.dtype)
    for name, exp in res.expected.items():
        got = res.outputs[name]
        floor = torch.finfo(case.dtype).smallest_normal * torch.finfo(case.dtype).eps  # subnormal spacing
        bad = ~((got - exp).abs() <= tol * res.bounds[name] + floor)
        if not bad.any():
            continue
        idx = tuple(int(i) for i in bad.nonzero()[0])
        if name == "y":
            mb = case.groups[0][3] if case.op in ("fwd", "indexed") else case.groups[0][4]
            t, o = idx
            where = f"token {t}, row {o // mb}, column {o % mb} (element {o} of {exp.shape[1]})"
        elif name == "dg":
            where = f"component {idx[0]}"
        else:
            k, r, c = idx
            where = f"component {k}, row {r}, column {c}"
        e, gv, bnd = exp[idx].item(), got[idx].item(), res.bounds[name][idx].item()
        return (
            f"{name}: first difference at {where}: expected {e:.6g}, got {gv:.6g} "
            f"(allowed {tol * bnd:.3g}); {int(bad.sum())} of {bad.numel()} elements differ"
        )
    return None


# ------------------------------------------------------------- gate softmax


def run_softmax(dtype: torch.dtype, rows: int, n: int, temperature: float, backward: bool, seed: int = 0,
                data_seed: int = 0, binary: Optional[Path] = None):
    """(got, expected, bound, stdout) for gate_softmax forward or backward against
    the float64 reference; bound is the sum of the absolute terms per element."""
    from moka_ext import reference

    binary = binary or build()
    g = torch.Generator().manual_seed(data_seed)
    logits = _rounded(torch.randn(rows, n, generator=g, dtype=torch.float64) * 2, dtype)
    with tempfile.TemporaryDirectory(prefix="moka_sim_") as tmp:
        tmp = Path(tmp)
        args = [str(binary), "softmax_bwd" if backward else "softmax_fwd", "--dir", str(tmp),
                "--dtype", NAMES[dtype], "--rows", str(rows), "--n", str(n),
                "--inv-temp", repr(1.0 / temperature), "--seed", str(seed)]
        if backward:
            s = _rounded(reference.gate_softmax(logits, temperature), dtype)
            grad = _rounded(torch.randn(rows, n, generator=g, dtype=torch.float64), dtype)
            _write(tmp / "grad.bin", grad, dtype, 0)
            _write(tmp / "output.bin", s, dtype, 0)
            # d/dlogits of <grad, softmax(logits / t)> at the given s.
            expected = s * (grad - (grad * s).sum(-1, keepdim=True)) / temperature
            bound = s * (grad.abs() + (grad * s).abs().sum(-1, keepdim=True)) / temperature
            name = "dlogits"
        else:
            _write(tmp / "logits.bin", logits, dtype, 0)
            expected = reference.gate_softmax(logits, temperature)
            # exp amplifies the rounding of its argument z - max(z), z = logits / t.
            z = (logits / temperature).abs()
            bound = expected * (1 + z + z.amax(-1, keepdim=True))
            name = "out"
        proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **RUN_ENV})
        if proc.returncode != 0:
            raise RuntimeError(f"moka_sim failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}")
        got, _ = _read(tmp / f"{name}.bin", dtype, 0, rows, n)
    return got, expected, bound, proc.stdout


# -------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:
        print(build())
        if cutlass_include() is None:
            print("nvidia-cutlass not installed: the CuTe fragment check is not built")
        else:
            print(build_cute_check())
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("op", choices=["fwd", "dx", "grad", "indexed"], help="or `build`: only build the simulation binaries")
    ap.add_argument("--dtype", choices=["f16", "bf16"], default="bf16")
    ap.add_argument("--tokens", type=int, help="tokens (fwd, dx, grad)")
    ap.add_argument("--row-adapter", help="indexed: each row's adapter, comma-separated (-1: none)")
    ap.add_argument("--adapters", type=int, default=1, help="indexed: number of adapters")
    ap.add_argument("--row-tokens", type=int, default=1, help="indexed: tokens per row")
    ap.add_argument("--groups", required=True, help="r:ma:na:mb:nb[,...]")
    ap.add_argument("--base", action="store_true")
    ap.add_argument("--x-stride", type=int)
    ap.add_argument("--y-stride", type=int)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="schedule seed")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--arch", choices=["sm_90", "sm_80"], default="sm_90")
    ap.add_argument("--impl", choices=["auto", "v1", "v2"], default="auto", help="kernel version (fwd, dx, grad)")
    a = ap.parse_args(argv)
    groups = [tuple(int(v) for v in g.split(":")) for g in a.groups.split(",")]
    extra = {}
    if a.op == "indexed":
        if not a.row_adapter:
            ap.error("indexed needs --row-adapter")
        ra = [int(v) for v in a.row_adapter.split(",")]
        extra = dict(row_adapter=ra, n_adapters=a.adapters, row_tokens=a.row_tokens)
        a.tokens = len(ra) * a.row_tokens
    elif a.tokens is None:
        ap.error(f"{a.op} needs --tokens")
    case = Case(a.op, DTYPES[a.dtype], a.tokens, groups, base=a.base, x_stride=a.x_stride, y_stride=a.y_stride,
                offset=a.offset, seed=a.seed, data_seed=a.data_seed, arch=a.arch, impl=a.impl, **extra)
    res = run(case)
    print(f"verdict: {res.verdict}")
    if res.schedule:
        print(res.schedule)
    for ln in res.launches:
        print(ln)
    print(f"result: {res.result}")
    if res.result != "cudaSuccess":
        return 1
    diff = first_difference(case, res)
    print(diff or f"all outputs match the float64 reference within {tolerance(case.dtype):.3g} x bound")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
