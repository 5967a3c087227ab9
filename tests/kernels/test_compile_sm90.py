"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU: frontend, TTGIR, LLVM, PTX and ptxas,
with the specialisations the JIT would use for contiguous Qwen2.5-7B-sized tensors (unit strides constant, pointers and
strides divisible by 16). The wide tiles must lower to Hopper wgmma with pipelined async copies.

The interpreter (which the other tests use without CUDA) never runs the GPU compiler, so this is the only CPU-side
check that the kernels are valid GPU code. It runs in a subprocess because TRITON_INTERPRET, set by tests/conftest.py,
is read when triton.jit decorates the kernels.

    python -m pytest tests/kernels/test_compile_sm90.py -q
    python tests/kernels/test_compile_sm90.py                  # one line per config: registers, spills, shared memory
    COMPILE_REPORT=regs.json python tests/kernels/test_compile_sm90.py   # ... and the report as JSON
"""
import json
import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compile_all():
    """Compile every autotune config of every kernel (and the bench's expand kernel); print one line each with the
    registers and spills that ptxas reports (triton runs `ptxas -v`; TRITON_DUMP_PTXAS_LOG hands us its log)."""
    sys.path.insert(0, str(ROOT))
    import contextlib
    import io
    import re

    import triton
    import triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import bench
    from kernels import multi_lora as ml

    knobs.nvidia.dump_ptxas_log = True
    report = []

    def compile_one(kernel, args, consts, num_warps, num_stages, want_wgmma, want_pipelined=True, label=""):
        sig, cx, attrs = {}, {}, {}
        fn = kernel
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name], cx[(i,)] = "constexpr", consts[name]
                continue
            ty, value = args[name]
            if value == 1:                                    # the JIT specialises ints equal to 1 as constants
                sig[name], cx[(i,)] = "constexpr", 1
                continue
            sig[name] = ty
            if ty.startswith("*") or (value is not None and value % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=num_warps, num_stages=num_stages))
        regs = re.findall(r"Used (\d+) registers", log.getvalue())
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
        assert regs, f"{fn.__name__} {consts}: no ptxas register report in:\n{log.getvalue()[-2000:]}"
        n_regs, n_spill = int(regs[-1]), sum(int(a) + int(b) for a, b in spills)
        ttgir = k.asm["ttgir"]
        wgmma, pipelined = "warp_group_dot" in ttgir, "async_copy" in ttgir or "async_tma" in ttgir
        blocks = {k_: v for k_, v in consts.items() if k_.startswith("BLOCK") or k_ == "FUSE_SHRINK"}
        line = (f"{fn.__name__:22s} {label:18s} {blocks} warps={num_warps} stages={num_stages} regs={n_regs} "
                f"spill_bytes={n_spill} shared={k.metadata.shared} wgmma={wgmma} pipelined={pipelined}")
        print(line, flush=True)
        report.append(dict(kernel=fn.__name__, label=label, consts={k_: str(v) for k_, v in consts.items()},
                           num_warps=num_warps, num_stages=num_stages, n_regs=n_regs, spill_bytes=n_spill,
                           shared=k.metadata.shared))
        assert "cubin" in k.asm, f"{fn.__name__} {consts}: no cubin"
        assert pipelined or not want_pipelined, f"{fn.__name__} {consts}: loads not pipelined"
        assert wgmma or not want_wgmma, f"{fn.__name__} {consts}: expected Hopper wgmma"

    def cfg(c):
        return c.kwargs, c.num_warps, c.num_stages

    I = O = 3584
    R, p, f32, i64 = 32, "*bf16", "*fp32", "*i64"
    shared = dict(bias_ptr=(p, None), scale_ptr=(f32, None), perm_ptr=(i64, None), tile_ptr=(i64, None),
                  mid_ptr=(f32, None), mid_out_ptr=(f32, None), out_ptr=(p, None), n_tiles=("i32", 67), N=("i32", O),
                  K=("i32", I), R=("i32", R), stride_ms=("i32", 512 * R))
    ptrs = dict(inp_ptr=(p, None), w_ptr=(p, None), p_ptr=(p, None), q_ptr=(p, None))
    # forward: (x, W^T, A^T, B^T) views; backward dX: (dY, W, B, A) -- see the custom ops in multi_lora.py
    fwd = dict(shared, **ptrs, stride_im=("i32", I), stride_ik=("i32", 1), stride_wk=("i32", 1), stride_wn=("i32", I),
               stride_pa=("i32", R * I), stride_pk=("i32", 1), stride_pr=("i32", I), stride_qa=("i32", O * R),
               stride_qr=("i32", 1), stride_qn=("i32", R), stride_mm=("i32", R), stride_om=("i32", O),
               stride_on=("i32", 1))
    bwd = dict(fwd, stride_im=("i32", O), stride_wk=("i32", I), stride_wn=("i32", 1), stride_pk=("i32", R),
               stride_pr=("i32", 1), stride_qr=("i32", I), stride_qn=("i32", 1), stride_om=("i32", I))
    gemm = lambda fuse, bm, split=1: dict(HAS_BIAS=True, FUSE_SHRINK=fuse, SPLIT_K=split, PRECISION="tf32",
                                          BLOCK_M=bm, BLOCK_R=R)
    # Every autotune config at the row-tile heights _prune_gemm gives it, both shrink placements (fused = the
    # register-heavy variant: a second accumulator); the backward layout once per config family.
    for c in ml._GEMM_WIDE:
        kw, w, s = cfg(c)
        for fuse in (False, True):
            compile_one(ml._gemm_expand_kernel, fwd, dict(gemm(fuse, 128), **kw), w, s, True, label="gemm wide fwd")
    for c in ml._GEMM_DECODE:
        kw, w, s = cfg(c)
        compile_one(ml._gemm_expand_kernel, fwd, dict(gemm(True, 16), **kw), w, s, False, label="gemm decode fwd")
    kw, w, s = cfg(ml._GEMM_WIDE[1])                          # the split-K shrink's epilogue (T ~ 512: 64-row tiles)
    compile_one(ml._gemm_expand_kernel, fwd, dict(gemm(False, 64, 8), **kw), w, s, True, label="gemm split-K 8")
    for c, bm in ((ml._GEMM_WIDE[0], 128), (ml._GEMM_DECODE[0], 16)):
        kw, w, s = cfg(c)
        compile_one(ml._gemm_expand_kernel, bwd, dict(gemm(bm <= 32, bm), **kw), w, s, bm >= 64, label="gemm bwd dX")
    fp32 = {k_: ("*fp32", v) if t == p else (t, v) for k_, (t, v) in fwd.items()}
    compile_one(ml._gemm_expand_kernel, fp32, dict(HAS_BIAS=False, FUSE_SHRINK=True, SPLIT_K=1, PRECISION="ieee",
                                                   BLOCK_M=64,
                                                   BLOCK_N=64, BLOCK_K=32, BLOCK_R=R, GROUP_M=8),
                4, 3, want_wgmma=False, label="gemm fp32")
    dec = dict(inp_ptr=(p, None), w_ptr=(p, None), bias_ptr=(p, None), p_ptr=(p, None), q_ptr=(p, None),
               scale_ptr=(f32, None), ids_ptr=(i64, None), out_ptr=(p, None), T=("i32", 64), N=("i32", O),
               K=("i32", I), R=("i32", R), NA=("i32", 4), stride_im=("i32", I), stride_ik=("i32", 1),
               stride_wk=("i32", 1), stride_wn=("i32", I), stride_pa=("i32", R * I), stride_pk=("i32", 1),
               stride_pr=("i32", I), stride_qa=("i32", O * R), stride_qr=("i32", 1), stride_qn=("i32", R),
               stride_om=("i32", O), stride_on=("i32", 1))
    for c in ml._DECODE:
        kw, w, s = cfg(c)
        compile_one(ml._decode_kernel, dec, dict(HAS_BIAS=True, PRECISION="tf32", BLOCK_M=64, BLOCK_R=R,
                                                 BLOCK_C=ml._decode_cols(4, R), **kw), w, s, True, label="decode")
    shrink = dict(inp_ptr=(p, None), p_ptr=(p, None), scale_ptr=(f32, None), perm_ptr=(i64, None),
                  tile_ptr=(i64, None), mid_ptr=(f32, None), K=("i32", I), R=("i32", R), n_split=("i32", 8),
                  stride_im=("i32", I), stride_ik=("i32", 1), stride_pa=("i32", R * I), stride_pk=("i32", 1),
                  stride_pr=("i32", I), stride_ms=("i32", 512 * R), stride_mm=("i32", R))
    for c in ml._shrink_configs():
        kw, w, s = cfg(c)
        compile_one(ml._shrink_kernel, shrink, dict(PRECISION="tf32", BLOCK_M=64, BLOCK_R=R, **kw), w, s, True,
                    label="shrink")
    outer = dict(perm_ptr=(i64, None), offsets_ptr=(i64, None), out_ptr=(f32, None), stride_oa=("i32", R * I),
                 n_chunks=("i32", 4), stride_oc=("i32", 4 * R * I))     # fp32 partial sums of 4 token chunks
    da = dict(outer, u_ptr=(f32, None), v_ptr=(p, None), P=("i32", R), Q=("i32", I), stride_um=("i32", R),
              stride_up=("i32", 1), stride_vm=("i32", I), stride_vq=("i32", 1), stride_op=("i32", I),
              stride_oq=("i32", 1))
    db = dict(outer, u_ptr=(p, None), v_ptr=(f32, None), P=("i32", O), Q=("i32", R), stride_um=("i32", O),
              stride_up=("i32", 1), stride_vm=("i32", R), stride_vq=("i32", 1), stride_op=("i32", R),
              stride_oq=("i32", 1))
    for c in ml._outer_configs():
        kw, w, s = cfg(c)
        for args, ug, bp, bq in ((da, False, R, 64), (db, True, 64, R)):
            compile_one(ml._segment_outer_kernel, args, dict(U_GATHER=ug, V_GATHER=not ug, DTYPE=tl.bfloat16,
                                                             PRECISION="tf32", BLOCK_P=bp, BLOCK_Q=bq, **kw),
                        w, s, want_wgmma=False, label="outer dA" if not ug else "outer dB")
    ex = dict(mid_ptr=(f32, None), q_ptr=(p, None), perm_ptr=(i64, None), tile_ptr=(i64, None), out_ptr=(p, None),
              N=("i32", O), R=("i32", R), stride_mm=("i32", R), stride_qa=("i32", O * R), stride_qr=("i32", 1),
              stride_qn=("i32", R), stride_om=("i32", O), stride_on=("i32", 1))
    compile_one(bench._expand_kernel, ex, dict(PRECISION="tf32", BLOCK_M=64, BLOCK_N=128, BLOCK_R=R), 4, 1,
                want_wgmma=False, want_pipelined=False, label="bench expand")
    n_configs = len(ml._GEMM_WIDE) + len(ml._GEMM_DECODE) + len(ml._DECODE) + len(ml._shrink_configs()) + \
        len(ml._outer_configs())
    print(f"compiled {len(report)} kernels covering all {n_configs} autotune configs; max regs "
          f"{max(r['n_regs'] for r in report)}, kernels with spills: "
          f"{[r['kernel'] + ' ' + r['label'] for r in report if r['spill_bytes']]}")
    if os.environ.get("COMPILE_REPORT"):
        Path(os.environ["COMPILE_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    return report


def test_kernels_compile_for_sm90():
    """Every config compiles to a cubin for sm_90 (fresh cache, so ptxas really runs and reports registers)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"compiling for sm_90 failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    print(r.stdout)
    assert "covering all" in r.stdout


if __name__ == "__main__":
    compile_all()
