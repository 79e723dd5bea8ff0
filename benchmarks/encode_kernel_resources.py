"""Registers and spills of the GPU encoder's Triton kernels for a Hopper GPU, without a GPU.

Usage: ``python benchmarks/encode_kernel_resources.py`` (Triton installed; no CUDA device needed).
Each kernel of ``kvwire.kernels.triton_encode`` is compiled for sm_90 at its default launch shape
(``gpu_encode.TUNING``, Llama-3-8B sizes) plus a few shapes of the table kernels, and Triton's bundled
``ptxas -v`` reports registers per thread, stack frame and spill bytes: the first thing to look at
when a kernel runs far slower than its operation count (docs/gpu.md, "Encoder").
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvwire.kernels import gpu_encode, rans
from kvwire.kernels import triton_encode as te

SYMBOLS = {
    "NUM_SYMBOLS": rans.NUM_SYMBOLS,
    "DIRECT_MAX": rans.DIRECT_MAX,
    "MIN_OCTAVE": rans.MIN_OCTAVE,
    "MAX_OCTAVE": rans.MAX_OCTAVE,
}


def ptxas_report(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    warps: int,
    divisible: Sequence[str] = (),
    options: dict[str, Any] | None = None,
) -> str:
    """Compile ``fn`` for sm_90 and return ptxas' register and spill lines.

    ``divisible`` names the arguments a launch specialises as multiples of 16 (Triton does so for every
    16-byte aligned pointer and every int divisible by 16): without them loads and stores compile to
    scalar accesses, and the registers differ from the launched kernel's. ``options`` are more compile
    options (``enable_fp_fusion``, ...).
    """
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": warps, **(options or {})},
    )
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(kernel.asm["ptx"])
        out = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    return "; ".join(
        line.split(":", 1)[-1].strip()
        for line in out.stderr.splitlines()
        if "registers" in line or "spill" in line
    )


def main() -> None:
    t = gpu_encode.TUNING
    transform_sig = {
        "kv_ptr": "*bf16", "sb": "i64", "sl": "i64", "sk": "i64", "sh": "i64", "st": "i64", "sd": "i64",
        "cos_ptr": "*fp32", "sin_ptr": "*fp32", "mean_ptr": "*fp32", "fwd_ptr": "*fp32", "inv_ptr": "*fp32",
        "n_sink_ptr": "*i32", "q_ptr": "*i32", "row_ptr": "*i32", "bad_ptr": "*i32", "S": "i32", "T": "i32",
        "d": "i32", "G": "i32", "HPG": "i32", "D": "i32", "HALF_SUB": "fp32", "HALF": "constexpr",
        "BT": "constexpr", "BN": "constexpr", "BK": "constexpr", "PRECISION": "constexpr",
    }  # fmt: skip
    count_sig = {
        "q_ptr": "*i32", "row_ptr": "*i32", "counts_ptr": "*i32", "S": "i32", "T": "i32", "d": "i32",
        "G": "i32", "n": "i32", "BC": "constexpr", "TT": "constexpr", "WIDEN": "constexpr",
        "GROUPS": "constexpr", "DIRECT_MAX": "constexpr",
        "MIN_OCTAVE": "constexpr", "MAX_OCTAVE": "constexpr",
    }  # fmt: skip
    cost_sig = {
        "counts_ptr": "*i32", "cost_ptr": "*fp64", "classes_ptr": "*u8", "n": "i32", "T": "i32",
        "BC": "constexpr", "KA": "constexpr", "KB": "constexpr", "NUM_SYMBOLS": "constexpr",
        "DIRECT_MAX": "constexpr",
    }  # fmt: skip
    rans_sig = {
        "q_ptr": "*i32", "row_ptr": "*i32", "live_ptr": "*i32", "n_live_ptr": "*i32", "classes_ptr": "*u8",
        "table_ptr": "*i32", "scratch_ptr": "*i16", "n_words_ptr": "*i32", "states_ptr": "*i32", "S": "i32",
        "T": "i32", "d": "i32", "G": "i32", "LANES": "i32", "CAP": "i32", "BLOCK": "constexpr",
        "PROB_BITS": "constexpr", **dict.fromkeys(SYMBOLS, "constexpr"),
    }  # fmt: skip
    transform = {"HALF": 64, "BT": t["bt"], "BN": t["bn"], "BK": t["bk"], "PRECISION": t["precision"]}
    print(
        f"transform (default): {ptxas_report(te.transform_kernel, transform_sig, transform, int(t['warps']))}"
    )
    ka, kb = gpu_encode._cost_blocks(78)
    groups = -(-rans.NUM_SYMBOLS // 4)
    for warps, tt in ((int(t["count_warps"]), int(t["count_tokens"])), (1, 16), (2, 8)):
        consts = {"BC": 32 * warps, "TT": tt, "WIDEN": 255 // tt * tt, "GROUPS": groups}
        consts.update({k: SYMBOLS[k] for k in SYMBOLS if "NUM" not in k})
        report = ptxas_report(te.count_kernel, count_sig, consts, warps)
        print(f"counts BC {32 * warps}, {warps} warps, {tt} tokens a load: {report}")
    for bc, warps in ((int(t["cost_bc"]), int(t["cost_warps"])), (64, 8), (64, 4)):
        consts = {"BC": bc, "KA": ka, "KB": kb, "NUM_SYMBOLS": rans.NUM_SYMBOLS}
        consts["DIRECT_MAX"] = rans.DIRECT_MAX
        print(f"costs BC {bc}, {warps} warps: {ptxas_report(te.cost_kernel, cost_sig, consts, warps)}")
    consts = {"BLOCK": 32, "PROB_BITS": rans.PROB_BITS, **SYMBOLS}
    print(f"rANS, 32 lanes, 1 warp: {ptxas_report(te.rans_kernel, rans_sig, consts, 1)}")


if __name__ == "__main__":
    main()
