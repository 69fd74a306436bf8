"""GPU-only code paths that the CPU interpreter cannot run, compiled for Hopper (sm_90) on the CPU.

Triton's interpreter has no ``griddepcontrol``, so the PDL variants of the skinny GEMM never run in these
tests. Triton can still compile them to PTX here (its wheel ships ptxas): this checks that they compile
and that the instruction order is the one PDL's correctness relies on — nothing touches global memory
before ``griddepcontrol.wait`` (the previous kernel may still be writing the input).
The compile runs in a subprocess: the interpreter (TRITON_INTERPRET=1, set by conftest on a CPU machine)
replaces ``triton.jit`` at import time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from deltaserve.ops.skinny_gemm import _skinny_gemm_kernel

    SIG = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32",
           "N": "i32", "K": "i32", "K_SPLIT": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}
    out = []
    for pdl, split, late, prefetch, group, left in json.loads(sys.argv[1]):
        consts = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "EVEN_K": True, "SPLIT_K": split,
                  "PRECISION": "tf32", "PDL": pdl, "LATE_TRIGGER": late, "PREFETCH_K": prefetch, "LINE": 64,
                  "SWAP": False, "GROUP": group, "TRIGGER_LEFT": left}
        # pointers and sizes 16-divisible, as Triton specialises them at a real launch: vectorised, pipelined
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(SIG) if n not in ("M",)}
        src = ASTSource(fn=_skinny_gemm_kernel, signature={**SIG, **{c: "constexpr" for c in consts}},
                        constexprs=consts, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
        # opcodes in order, predicates stripped; only what touches global memory or orders launches
        ops = re.findall(r"^\\s*(?:@!?%p\\d+\\s+)?([a-z][\\w.]*)", ptx, re.M)
        keep = ("ld.global", "st.global", "cp.async", "atom.", "red.", "prefetch.", "griddepcontrol")
        out.append([o for o in ops if o.startswith(keep)])
    print(json.dumps(out))
    """
)


def _compiled_ops(variants: list[tuple[bool, int, bool, int, int, int]]) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(variants)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_skinny_gemm_pdl_variants_compile_for_sm90_in_the_right_order():
    # (PDL, split-K, late trigger, prefetch columns, row tiles per program, trigger K steps before the end)
    plain, pdl, pdl_split, late, late_split, prefetch, grouped, left = _compiled_ops(
        [(False, 1, False, 0, 1, 0), (True, 1, False, 0, 1, 0), (True, 4, False, 0, 1, 0), (True, 1, True, 0, 1, 0),
         (True, 4, True, 0, 1, 0), (True, 1, True, 256, 1, 0), (True, 1, True, 256, 3, 0), (True, 1, True, 256, 3, 2)])
    assert not any(o.startswith("griddepcontrol") for o in plain)
    for ops in (pdl, pdl_split, late, late_split, prefetch, grouped, left):
        wait = ops.index("griddepcontrol.wait")
        if ops in (prefetch, grouped, left):  # only weight hints before the wait: 32 rows x 4 lines over 128 threads
            assert ops[:wait] and set(ops[:wait]) == {"prefetch.global.L2"}
        else:
            assert ops[:wait] == []  # no global memory touched before the wait
        assert any(o.startswith(("ld.global", "cp.async")) for o in ops[wait:])  # the real loads come after
        assert ops.count("griddepcontrol.launch_dependents") == 1
        trigger = ops.index("griddepcontrol.launch_dependents")
        assert trigger > wait
        if ops in (pdl, pdl_split):
            assert trigger == wait + 1
        elif ops is left:  # inside the K loop: the loop's own loads follow it, then the stores
            assert any(o.startswith("cp.async") for o in ops[trigger:])
            assert any(o.startswith("st.global") for o in ops[trigger:])
        else:  # late: every load of the K loop is issued before the next kernel may launch
            assert not any(o.startswith(("ld.global", "cp.async")) for o in ops[trigger:] if ".cg" not in o)
            assert any(o.startswith("st.global") for o in ops[trigger:])
    assert any(o.startswith("atom.") for o in pdl_split)  # the split-K arrival counter
    assert left[left.index("griddepcontrol.wait"):] != grouped[grouped.index("griddepcontrol.wait"):]


SMEM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from deltaserve.ops.skinny_gemm import _skinny_gemm_kernel

    SIG = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32",
           "N": "i32", "K": "i32", "K_SPLIT": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}
    out = []
    for bm, bn, bk, stages, split, swap, group in json.loads(sys.argv[1]):
        consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "EVEN_K": True, "SPLIT_K": split,
                  "PRECISION": "tf32", "PDL": True, "LATE_TRIGGER": False, "PREFETCH_K": 0, "LINE": 64,
                  "SWAP": swap, "GROUP": group, "TRIGGER_LEFT": 0}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(SIG) if n != "M"}
        src = ASTSource(fn=_skinny_gemm_kernel, signature={**SIG, **{c: "constexpr" for c in consts}},
                        constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
        out.append(k.metadata.shared)
    print(json.dumps(out))
    """
)


def test_resident_programs_per_sm_follow_the_compilers_shared_memory():
    """The late-trigger rule needs how many programs of a tile an SM holds; resident_per_sm models the
    shared memory of the pipelined kernel, checked here against Triton's own figure for the sm_90 build
    (the same numbers an H200 reported for these tiles in docs/perf/2026-11-28g.md)."""
    from deltaserve.ops.skinny_gemm import SMEM_PER_SM, GemvConfig, resident_per_sm

    tiles = [(16, 32, 128, 3, 1, False, 1), (32, 64, 128, 3, 1, False, 1), (64, 64, 128, 3, 1, False, 1),
             (16, 64, 128, 5, 4, False, 1), (32, 32, 128, 5, 2, False, 1), (64, 32, 128, 5, 2, False, 1),
             (64, 128, 128, 4, 1, False, 1), (16, 128, 64, 3, 1, False, 1), (16, 64, 128, 3, 1, True, 1),
             (32, 128, 64, 4, 1, True, 1), (64, 32, 128, 3, 1, False, 3), (64, 32, 128, 3, 1, True, 3),
             (16, 32, 128, 3, 1, False, 3)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SMEM_SCRIPT, json.dumps(tiles)], capture_output=True, text=True,
                       env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    shared = json.loads(r.stdout.strip().splitlines()[-1])
    assert shared[:3] == [24576, 49152, 98304]  # as compiled on the H200
    for (bm, bn, bk, stages, split, swap, group), smem in zip(tiles, shared):
        cfg = GemvConfig(block_n=bn, block_k=bk, num_stages=stages, split_k=split, swap=swap, group=group)
        assert resident_per_sm(cfg, bm, 2) == min(SMEM_PER_SM // (smem + 1024), 16), (bm, bn, bk, stages, smem)



PRELOAD_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from deltaserve.ops.fused_moe_triton import _gemv_w2_kernel
    from deltaserve.ops.gdn_decode import _gdn_decode_fused_kernel

    GDN = ({"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "w_ptr": "*bf16", "conv_ptr": "*bf16",
            "ssm_ptr": "*fp32", "idx_ptr": "*i32", "pos_ptr": "*i64", "A_log_ptr": "*fp32", "dt_bias_ptr": "*fp32",
            "o_ptr": "*bf16", "sx_b": "i32", "sa_b": "i32", "sb_b": "i32", "scale": "fp32"},
           {"HK": 16, "HV": 32, "DK": 128, "DV": 128, "W": 4, "BK": 128, "BV": 64})
    W2 = ({"inter_ptr": "*bf16", "w2_ptr": "*bf16", "out_ptr": "*bf16", "weights_ptr": "*fp32", "ids_ptr": "*i32",
           "stride_it": "i32", "stride_we": "i32", "stride_wn": "i32", "stride_ot": "i32"},
          {"H": 2048, "I": 512, "TOP_K": 9, "K_PAD": 16, "BLOCK_N": 2, "BLOCK_K": 512, "EVEN": True,
           "LATE_TRIGGER": False})
    out = []
    for name, preload in json.loads(sys.argv[1]):
        fn, (sig, consts) = {"gdn": (_gdn_decode_fused_kernel, GDN), "w2": (_gemv_w2_kernel, W2)}[name]
        consts = {**consts, "PDL": True, "PRELOAD": preload}
        attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items()) if t != "fp32"}
        src = ASTSource(fn=fn, signature={**sig, **{c: "constexpr" for c in consts}}, constexprs=consts, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        ops = re.findall(r"^\\s*(?:@!?%p\\d+\\s+)?([a-z][\\w.]*)", ptx, re.M)
        keep = ("ld.global", "st.global", "cp.async", "atom.", "red.", "griddepcontrol")
        out.append([o for o in ops if o.startswith(keep)])
    print(json.dumps(out))
    """
)


def test_preload_variants_read_only_before_the_pdl_wait():
    """``--pdl-preload``: the GDN decode kernel and the MoE w2 GEMV read (the slot, the state tile; the
    ids, the gate weights and the first weight chunk) before ``griddepcontrol.wait`` and write nothing
    there; without it nothing touches global memory before the wait."""
    variants = [("gdn", False), ("gdn", True), ("w2", False), ("w2", True)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", PRELOAD_SCRIPT, json.dumps(variants)], capture_output=True, text=True,
                       env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    for (name, preload), ops in zip(variants, json.loads(r.stdout.strip().splitlines()[-1])):
        wait = ops.index("griddepcontrol.wait")
        before, after = ops[:wait], ops[wait:]
        assert "griddepcontrol.launch_dependents" in after, name
        assert any(o.startswith("st.global") for o in after), name
        if preload:
            assert before and all(o.startswith("ld.global") for o in before), (name, before)
        else:
            assert before == [], (name, before)


SKINNY_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from deltaserve.ops import skinny_gemm

    out = []
    for kernel, sig, consts, stages in json.loads(sys.argv[1]):
        # pointers, sizes and strides 16-divisible (as Triton specialises them at a real launch), M left free
        attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
                 if n != "M" and not t.startswith("tensordesc")}
        src = ASTSource(fn=getattr(skinny_gemm, kernel), signature={**sig, **{c: "constexpr" for c in consts}},
                        constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": stages})
        ops = re.findall(r"^\\s*(?:@!?%p\\d+\\s+)?([a-z][\\w.]*)", k.asm["ptx"], re.M)
        keep = ("ld.global", "st.global", "cp.async", "griddepcontrol", "mma.", "wgmma.mma_async")
        out.append([o for o in ops if o.startswith(keep)])
    print(json.dumps(out))
    """
)


def _skinny_ops(variants: list[tuple[str, dict, dict, int]]) -> list[list[str]]:
    """PTX opcodes (global memory, PDL, MMA) of skinny GEMM kernels compiled for sm_90:
    ``(kernel name, signature, constexprs, num_stages)`` each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SKINNY_SCRIPT, json.dumps(variants)], capture_output=True, text=True,
                       env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_persistent_skinny_gemm_pipelines_across_tiles_on_sm90():
    """The persistent launch (a program loops over row tiles in one flattened loop), compiled for sm_90: nothing
    touches global memory before the PDL wait, the trigger comes once (after the wait, or after every load with
    the late trigger), and the loop is pipelined across tiles: the loads of later K steps (the next tile's
    first ones, at a tile's end) are issued before a tile's store."""
    variants = [(64, 32, 4, False, False), (64, 64, 3, False, True), (16, 32, 5, False, True), (32, 64, 4, True, False)]
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "n_tiles": "i32",
           "programs": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32"}
    compiled = _skinny_ops([("_skinny_gemm_persistent_kernel", sig, {
        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "EVEN_K": True, "PRECISION": "tf32", "PDL": True,
        "LATE_TRIGGER": late, "SWAP": swap}, stages) for bm, bn, stages, swap, late in variants])
    for (bm, bn, _stages, swap, late), ops in zip(variants, compiled):
        wait = ops.index("griddepcontrol.wait")
        assert ops[:wait] == [], ops[:wait]
        assert ops.count("griddepcontrol.launch_dependents") == 1
        trigger = ops.index("griddepcontrol.launch_dependents")
        if late:
            assert not any(o.startswith(("ld.global", "cp.async")) for o in ops[trigger:])
        else:
            assert trigger == wait + 1
        first_mma = next(i for i, o in enumerate(ops) if o.startswith(("mma.", "wgmma.mma_async")))
        first_store = next(i for i, o in enumerate(ops) if o.startswith("st.global"))
        assert "cp.async.commit_group" in ops[first_mma:first_store], (bm, bn, swap, ops[first_mma:first_store])


def test_tma_skinny_gemm_loads_by_bulk_tensor_copies_after_the_pdl_wait_on_sm90():
    """The TMA tile compiled for sm_90: every operand load is a bulk tensor copy (no per-thread global loads),
    issued only after the PDL wait, several K steps ahead of the first MMA (pipelined); the trigger once, after
    the wait or after the last load (late)."""
    variants = [(16, 32, 3, False, False), (64, 64, 3, False, True), (32, 64, 4, True, False), (64, 128, 4, True, True)]
    compiled = _skinny_ops([("_skinny_gemm_tma_kernel", {
        "x_desc": f"tensordesc<bf16[{bm}, 128]>", "w_desc": f"tensordesc<bf16[{bn}, 128]>", "y_ptr": "*bf16",
        "M": "i32", "N": "i32", "K": "i32", "stride_ym": "i32"}, {
        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "PRECISION": "tf32", "PDL": True, "LATE_TRIGGER": late,
        "SWAP": swap}, stages) for bm, bn, stages, swap, late in variants])
    for (bm, bn, stages, swap, late), ops in zip(variants, compiled):
        wait = ops.index("griddepcontrol.wait")
        assert ops[:wait] == [], ops[:wait]
        assert not any(o.startswith("ld.global") for o in ops)
        copies = [i for i, o in enumerate(ops) if o.startswith("cp.async.bulk.tensor")]
        first_mma = next(i for i, o in enumerate(ops) if o.startswith(("mma.", "wgmma.mma_async")))
        # the prologue: one copy of x and one of w for each of the first stages - 1 K steps
        assert sum(i < first_mma for i in copies) >= 2 * (stages - 1), (bm, bn, swap, ops[:first_mma])
        assert ops.count("griddepcontrol.launch_dependents") == 1
        trigger = ops.index("griddepcontrol.launch_dependents")
        if late:
            assert trigger > copies[-1]
        else:
            assert trigger == wait + 1
        assert any(o.startswith("st.global") for o in ops[trigger:])
