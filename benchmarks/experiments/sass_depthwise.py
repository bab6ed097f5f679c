"""Offline SASS of the rolling depthwise kernel (no GPU needed): registers a thread, ``cp.async``
copies (pipelined row loops) and instructions an output in its main loop, by opcode, compiled for
sm_90 with the specialisation a CUDA launch of gpu.py's depthwise rows gets (``OG`` = ``sxc`` =
``syc`` = 1 constant; sizes and strides that are multiples of 16 marked so).

    python -m benchmarks.experiments.sass_depthwise [fp16|bf16|fp32 ...]

Uses the ``nvdisasm`` and ``cuobjdump`` that come with Triton's NVIDIA backend.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mpsconv.backends import _triton_kernels as kernels  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
#: Integer arguments that are multiples of 16 on gpu.py's depthwise rows (144 and 384 channels).
DIVISIBLE = ("OC", "sxn", "sxh", "sxw", "syn", "syh", "syw")
#: The kernel's (BH output rows, BF row positions, ROLL rows a step, warps, stages): those of 3x3
#: candidates (``triton.rolling_band``: a band of 32 source rows makes 30 output rows), then pipelined
#: row loops.
VARIANTS = [(30, 512, 8, 4, 1), (14, 256, 8, 2, 1), (14, 256, 16, 2, 1), (30, 512, 4, 4, 1), (30, 512, 1, 4, 3),
            (30, 512, 1, 4, 6), (30, 1024, 1, 4, 4), (30, 512, 2, 4, 4)]


def compile_rolling(dtype: str, bh: int, bf: int, roll: int, warps: int, stages: int):
    fn = kernels.direct_rolling_nhwc
    const = dict(KH=3, KW=3, IG=1, CLAMP=False, UPSAMPLE=False, SUBPIXEL=1, NEURON=1, HAS_BIAS=True, BH=bh, BF=bf,
                 ROLL=roll, STAGES=stages, WIDE=False, OG=1, sxc=1, syc=1)
    sig = {}
    for name in fn.arg_names:
        if name in const:
            sig[name] = "constexpr"
        elif name in ("x_ptr", "y_ptr", "w_ptr"):
            sig[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name in ("na", "nb", "nc", "np2") else "i32"
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if n.endswith("_ptr") or n in DIVISIBLE}
    constexprs = {(fn.arg_names.index(k),): v for k, v in const.items()}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest backward branch's span: the rolling kernel's row loop."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        op = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if op:
            instructions.append(op.group(1))
    best = (0, 0)
    for i, ins in enumerate(instructions):
        target = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", ins)
        if target and labels.get(target.group(1), i) < i and i - labels[target.group(1)] > best[1] - best[0]:
            best = (labels[target.group(1)], i + 1)
    return instructions[best[0]:best[1]]


def main(dtypes):
    for dtype in dtypes or ["fp16", "fp32"]:
        for bh, bf, roll, warps, stages in VARIANTS:
            compiled = compile_rolling(dtype, bh, bf, roll, warps, stages)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                sass = subprocess.run([f"{BIN}/nvdisasm", "-c", f.name], capture_output=True, text=True).stdout
                usage = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", f.name], capture_output=True,
                                       text=True).stdout
            loop = main_loop(sass)
            outputs = roll * bf // (32 * warps)  # a thread's outputs per loop step
            staged = sum("LDGSTS" in i for i in loop)  # cp.async: rows staged through shared memory
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for i in loop)
            top = ", ".join(f"{k} {v / outputs:.2f}" for k, v in ops.most_common(12))
            registers = re.findall(r"REG:(\d+)", usage)[0]
            print(f"{dtype} BH={bh} BF={bf} ROLL={roll} w{warps} s{stages}: {registers} registers, {staged} cp.async, "
                  f"loop {len(loop)} instructions for {outputs} outputs = {len(loop) / outputs:.1f} an output | {top}",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
