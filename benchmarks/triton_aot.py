""" The Triton kernels compiled ahead of time for real GPUs, on this (CPU) machine: registers, shared memory,
occupancy and tensor-core instructions per configuration.

    python benchmarks/triton_aot.py [--jobs N] [--out ...] [--no-docs] [--smoke]

Every launch configuration the Triton backend makes for the depthwise large-kernel convs of every registered model
at its default resolution (forward, input gradient, kernel gradient; bf16, fp16, fp32 with TF32; NCHW and
channels_last), compiled for sm_80, sm_90 and sm_100 (where the triton wheel's ptxas has it) by
`timm_smpconv.triton_aot`. Writes benchmarks/results/triton_aot.md and the table in docs/performance.md (between
its triton-aot markers). --smoke: smpconv_mobile31, bf16, sm_80 only, docs untouched.
"""
import time
from pathlib import Path

import torch
from harness import SMOKE_NOTE, bench_parser, machine_line, parse_args, positive_int, write_results

from timm_smpconv import triton_aot

DOCS = Path(__file__).resolve().parents[1] / 'docs' / 'performance.md'


def main(argv=None):
    parser = bench_parser(__doc__, 'triton_aot.md', threads=False)
    parser.add_argument('--jobs', type=positive_int, default=None, help='compiler processes (default: one per CPU)')
    parser.add_argument('--no-docs', action='store_true', help='leave docs/performance.md as it is')
    args = parse_args(parser, argv)
    reason = triton_aot.tools_available()
    if reason:
        raise SystemExit(f'cannot compile ahead of time here: {reason}')
    archs = (80,) if args.smoke else triton_aot.supported_archs()
    models = ['smpconv_mobile31'] if args.smoke else None
    precisions = triton_aot.PRECISIONS[:1] if args.smoke else triton_aot.PRECISIONS
    start = time.perf_counter()
    configs = triton_aot.aot_configurations(models, precisions, archs)
    reports = triton_aot.compile_configurations(configs, archs, jobs=args.jobs)
    seconds = time.perf_counter() - start
    block = triton_aot.docs_block(configs, reports)
    bad = [f'{c.describe()} on sm_{r.arch}' for c, row in zip(configs, reports) for r in row
           if r.spill_stores or r.spill_loads or r.registers > 255 or r.shared > r.shared_limit or not r.tensor_core]
    lines = ['# Triton kernels compiled ahead of time' + (SMOKE_NOTE if args.smoke else ''), '',
             machine_line('python benchmarks/triton_aot.py'), '',
             f'{len(configs)} configurations x {len(archs)} architectures compiled in {seconds:.0f} s. Cells: registers '
             'per thread, shared memory per block, theoretical occupancy (resident warps / maximum), tensor-core '
             'instructions in the SASS; spill bytes where there are any '
             f'({len(bad)} configurations over a limit{": " + "; ".join(bad) if bad else ""}).', '',
             ] + triton_aot.format_table(configs, reports) + ['', '## Where each configuration is used', '']
    for i, c in enumerate(configs):
        lines.append(f'{i + 1}. {c.describe()}: ' + '; '.join(c.uses))
    print(f'wrote {write_results(args.out, lines)} ({len(configs)} configurations, {seconds:.0f} s)')
    if not (args.smoke or args.no_docs):
        DOCS.write_text(triton_aot.replace_docs_block(DOCS.read_text(), block))
        print(f'updated {DOCS}')
    return configs, reports


if __name__ == '__main__':
    torch.set_num_threads(1)
    main()
