"""Registers and spills of the GPU decoder's Triton kernels for a Hopper GPU, without a GPU.

Usage: ``python benchmarks/decode_kernel_resources.py`` (Triton installed; no CUDA device needed).
The rANS kernel (both symbol lookups) and the reconstruction kernel at its launch shapes
(``gpu.TUNING``, Llama-3-8B sizes: d = 128, head dim 128, bf16 out) are compiled for sm_90 and
Triton's bundled ``ptxas -v`` reports registers per thread, stack frame and spill bytes (same
method as benchmarks/encode_kernel_resources.py, whose compile helper this uses), with the launch's
specialisation (aligned pointers, ``d`` a multiple of 16) and options (no FMA contraction in the
reconstruction). The reconstruction is compiled in both of its launches (``WIDE`` 0 and 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.encode_kernel_resources import ptxas_report
from kvwire.kernels import gpu
from kvwire.kernels import triton_rans as tr
from kvwire.kernels import triton_recon as trc


def main() -> None:
    rans_sig = {
        "words_ptr": "*i16", "states_ptr": "*i32", "bytes_ptr": "*u8", "meta_ptr": "*i64", "live_ptr": "*i32",
        "out_ptr": "*i32", "table_ptr": "*u8", "symtab_ptr": "*i32", "status_ptr": "*i32", "sink_ptr": "*i32",
        "S": "i32", "SP": "i32", "D": "i32", "META": "constexpr", "SEGS": "constexpr", "BLOCK": "constexpr",
        "DBLOCK": "constexpr", "LUT8": "constexpr", "PREFETCH": "constexpr",
        **dict.fromkeys(tr.DECODE_CONSTANTS, "constexpr"),
    }  # fmt: skip
    for lut8, prefetch, block, warps in ((0, 0, 32, 1), (1, 64, 32, 1), (1, 64, 128, 4)):
        sig = dict(rans_sig, table_ptr="*u8" if lut8 else "*i32")
        consts = {
            "META": gpu.CHUNK_META, "SEGS": 1, "BLOCK": block, "DBLOCK": 128, "LUT8": lut8,
            "PREFETCH": prefetch, **tr.DECODE_CONSTANTS,
        }  # fmt: skip
        ptrs = [n for n, ty in sig.items() if ty.startswith("*")]
        report = ptxas_report(tr.decode_kernel, sig, consts, warps, divisible=ptrs)
        print(f"rANS, {block} lanes, lut8 {lut8}, prefetch {prefetch}, {warps} warps: {report}")
    recon_sig = {
        "q_ptr": "*i32", "meta_ptr": "*i64", "scale_ptr": "*fp64", "bytes_ptr": "*u8", "b0_ptr": "*i8",
        "b1_ptr": "*i8", "mean_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "out_ptr": "*bf16",
        "wide_ptr": "*i8", "d": "i32", "SP": "i32", "G": "i32", "H": "i32", "META": "constexpr",
        "HALF": "constexpr", "HAS_ROPE": "constexpr", "BT": "constexpr", "KP": "constexpr",
        "HALFP": "constexpr", "QVEC": "constexpr", "OVEC": "constexpr", "WIDE": "constexpr",
    }  # fmt: skip
    divisible = [n for n, ty in recon_sig.items() if ty.startswith("*")] + ["d"]
    t = gpu.TUNING
    for bt, warps in ((int(t["recon_bt"]), int(t["recon_warps"])), (64, 8), (128, 8)):
        for wide in (0, 1):
            consts = {
                "META": gpu.CHUNK_META, "HALF": 64, "HAS_ROPE": True, "BT": bt, "KP": 128, "HALFP": 64,
                "QVEC": 16, "OVEC": 16, "WIDE": wide,
            }  # fmt: skip
            report = ptxas_report(
                trc.reconstruct_kernel, recon_sig, consts, warps, divisible, {"enable_fp_fusion": False}
            )
            print(f"reconstruction, BT {bt}, {warps} warps, WIDE {wide}: {report}")


if __name__ == "__main__":
    main()
