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
    for pdl, split in json.loads(sys.argv[1]):
        consts = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "EVEN_K": True, "SPLIT_K": split,
                  "PRECISION": "tf32", "PDL": pdl}
        src = ASTSource(fn=_skinny_gemm_kernel, signature={**SIG, **{c: "constexpr" for c in consts}},
                        constexprs=consts)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
        # opcodes in order, predicates stripped; only what touches global memory or orders launches
        ops = re.findall(r"^\\s*(?:@!?%p\\d+\\s+)?([a-z][\\w.]*)", ptx, re.M)
        keep = ("ld.global", "st.global", "cp.async", "atom.", "red.", "prefetch.", "griddepcontrol")
        out.append([o for o in ops if o.startswith(keep)])
    print(json.dumps(out))
    """
)


def _compiled_ops(variants: list[tuple[bool, int]]) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(variants)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_skinny_gemm_pdl_variants_compile_for_sm90_in_the_right_order():
    # (PDL, split-K)
    plain, pdl, pdl_split = _compiled_ops([(False, 1), (True, 1), (True, 4)])
    assert not any(o.startswith("griddepcontrol") for o in plain)
    for ops in (pdl, pdl_split):
        wait = ops.index("griddepcontrol.wait")
        assert ops[wait + 1] == "griddepcontrol.launch_dependents"
        assert ops[:wait] == []  # no global memory touched before the wait
        assert any(o.startswith(("ld.global", "cp.async")) for o in ops[wait:])  # the real loads come after
    assert any(o.startswith("atom.") for o in pdl_split)  # the split-K arrival counter
