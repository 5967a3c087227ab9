"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU: frontend, TTGIR, LLVM, PTX and ptxas,
with the specialisations the JIT would use for contiguous Qwen2.5-7B-sized tensors (unit strides constant, pointers and
strides divisible by 16). The wide tiles must lower to Hopper wgmma with pipelined async copies.

The interpreter (which the other tests use without CUDA) never runs the GPU compiler, so this is the only CPU-side
check that the kernels are valid GPU code. It runs in a subprocess because TRITON_INTERPRET, set by tests/conftest.py,
is read when triton.jit decorates the kernels.

    python -m pytest tests/kernels/test_compile_sm90.py -q
    python tests/kernels/test_compile_sm90.py                  # prints one line per compiled kernel
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compile_all():
    sys.path.insert(0, str(ROOT))
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import multi_lora as ml

    def compile_one(kernel, args, consts, num_warps, num_stages, want_wgmma, want_pipelined=True):
        sig, cx, attrs = {}, {}, {}
        for i, name in enumerate(kernel.arg_names):
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
        k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=cx, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
        ttgir = k.asm["ttgir"]
        wgmma, pipelined = "warp_group_dot" in ttgir, "async_copy" in ttgir or "async_tma" in ttgir
        print(f"{kernel.__name__} {consts} shared={k.metadata.shared} wgmma={wgmma} pipelined={pipelined}")
        assert "cubin" in k.asm, f"{kernel.__name__} {consts}: no cubin"
        assert pipelined or not want_pipelined, f"{kernel.__name__} {consts}: loads not pipelined"
        assert wgmma or not want_wgmma, f"{kernel.__name__} {consts}: expected Hopper wgmma"

    I = O = 3584
    R, p, f32, i64 = 32, "*bf16", "*fp32", "*i64"
    shared = dict(bias_ptr=(p, None), scale_ptr=(f32, None), perm_ptr=(i64, None), tile_ptr=(i64, None),
                  mid_ptr=(f32, None), out_ptr=(p, None), n_tiles=("i32", 67), N=("i32", O), K=("i32", I), R=("i32", R))
    ptrs = dict(inp_ptr=(p, None), w_ptr=(p, None), p_ptr=(p, None), q_ptr=(p, None))
    # forward: (x, W^T, A^T, B^T) views; backward dX: (dY, W, B, A) -- see _MultiLoRA
    fwd = dict(shared, **ptrs, stride_im=("i32", I), stride_ik=("i32", 1), stride_wk=("i32", 1), stride_wn=("i32", I),
               stride_pa=("i32", R * I), stride_pk=("i32", 1), stride_pr=("i32", I), stride_qa=("i32", O * R),
               stride_qr=("i32", 1), stride_qn=("i32", R), stride_mm=("i32", R), stride_om=("i32", O),
               stride_on=("i32", 1))
    bwd = dict(fwd, stride_im=("i32", O), stride_wk=("i32", I), stride_wn=("i32", 1), stride_pk=("i32", R),
               stride_pr=("i32", 1), stride_qr=("i32", I), stride_qn=("i32", 1), stride_om=("i32", I))
    for args in (fwd, bwd):
        for fuse in (True, False):
            for bm, bn, bk, w, st in [(128, 256, 64, 8, 3), (16, 64, 128, 4, 4)]:
                consts = dict(HAS_BIAS=True, FUSE_SHRINK=fuse, ADD_OUT=False, PRECISION="tf32", BLOCK_M=bm,
                              BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=R, GROUP_M=8)
                compile_one(ml._gemm_expand_kernel, args, consts, w, st, want_wgmma=bm >= 64)
    expand_only = dict(HAS_BIAS=False, FUSE_SHRINK=False, ADD_OUT=True, PRECISION="tf32", BLOCK_M=64, BLOCK_N=128,
                       BLOCK_K=64, BLOCK_R=R, GROUP_M=8)                      # the bench's unfused expand (no K loop)
    compile_one(ml._gemm_expand_kernel, fwd, expand_only, 4, 3, want_wgmma=True, want_pipelined=False)
    fp32 = {k: ("*fp32", v) if t == p else (t, v) for k, (t, v) in fwd.items()}
    compile_one(ml._gemm_expand_kernel, fp32, dict(HAS_BIAS=False, FUSE_SHRINK=True, ADD_OUT=False, PRECISION="ieee",
                                                   BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_R=R, GROUP_M=8),
                4, 3, want_wgmma=False)
    compile_one(ml._shrink_kernel, dict(inp_ptr=(p, None), p_ptr=(p, None), scale_ptr=(f32, None), perm_ptr=(i64, None),
                                        tile_ptr=(i64, None), mid_ptr=(f32, None), K=("i32", I), R=("i32", R),
                                        stride_im=("i32", I), stride_ik=("i32", 1), stride_pa=("i32", R * I),
                                        stride_pk=("i32", 1), stride_pr=("i32", I), stride_mm=("i32", R)),
                dict(PRECISION="tf32", BLOCK_M=64, BLOCK_K=128, BLOCK_R=R), 4, 3, want_wgmma=True)
    outer = dict(perm_ptr=(i64, None), offsets_ptr=(i64, None), out_ptr=(p, None), stride_oa=("i32", R * I))
    da = dict(outer, u_ptr=(f32, None), v_ptr=(p, None), P=("i32", R), Q=("i32", I), stride_um=("i32", R),
              stride_up=("i32", 1), stride_vm=("i32", I), stride_vq=("i32", 1), stride_op=("i32", I),
              stride_oq=("i32", 1))
    db = dict(outer, u_ptr=(p, None), v_ptr=(f32, None), P=("i32", O), Q=("i32", R), stride_um=("i32", O),
              stride_up=("i32", 1), stride_vm=("i32", R), stride_vq=("i32", 1), stride_op=("i32", R),
              stride_oq=("i32", 1))
    for args, ug, bp, bq in ((da, False, R, 64), (db, True, 64, R)):
        compile_one(ml._segment_outer_kernel, args, dict(U_GATHER=ug, V_GATHER=not ug, DTYPE=tl.bfloat16,
                                                         PRECISION="tf32", BLOCK_T=64, BLOCK_P=bp, BLOCK_Q=bq),
                    4, 3, want_wgmma=False)


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"compiling for sm_90 failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"


if __name__ == "__main__":
    compile_all()
