""" Ahead-of-time compilation of the package's Triton kernels for real GPUs, on a machine without one.

`triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget('cuda', arch, 32))` builds the
PTX and the cubin a GPU run would build, with the ptxas shipped in the triton wheel and no driver or GPU. This
module compiles every launch the Triton backend makes for the large-kernel convs of the package's models and
reports, per configuration and architecture: registers per thread and spill bytes (ptxas -v), shared memory per
block (static + dynamic) against the architecture's per-block limit, the theoretical occupancy that follows, and
the tensor-core instructions of the SASS (the wheel's nvdisasm: HMMA, HGMMA on sm_90, UTC*MMA on sm_100).

What is compiled is what the backend would launch: the launches come from the backend's own launch functions
(`triton_dwconv.forward_launch` / `weight_grad_launch`) on meta tensors shaped like the models' convs (found by
running each model on the meta device, as built and reparameterized), and the signature, constexprs and alignment
attributes from Triton's own binder (`create_function_from_signature`, the JIT's specialization). Launches with
the same compile key are one configuration, compiled once per architecture.

    from timm_smpconv.triton_aot import aot_configurations, compile_configurations, supported_archs
    configs = aot_configurations(['smpconv_t'])
    reports = compile_configurations(configs, supported_archs())  # [[AotReport per arch] per configuration]

`compile_configurations` uses worker processes (spawned: call it under `if __name__ == '__main__':` in a script).
`python benchmarks/triton_aot.py` writes the table of docs/performance.md; `pytest -k aot` checks every
configuration.
"""
import bisect
import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import re
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple
from unittest import mock

import torch

__all__ = [
    'ARCH_LIMITS', 'AotConfiguration', 'AotReport', 'DepthwiseConvCall', 'PRECISIONS', 'aot_configurations',
    'compile_configurations', 'dispatched_depthwise_convs', 'docs_block', 'format_table',
    'occupancy', 'replace_docs_block',
    'read_sass', 'supported_archs', 'tools_available',
]


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits of a compute capability (CUDA programming guide, compute capability tables)."""
    shared_per_block: int  # bytes, the opt-in maximum of one block
    shared_per_sm: int  # bytes
    shared_reserved_per_block: int  # bytes the system reserves per resident block
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    register_unit: int = 256  # registers are allocated per warp in units of 256


ARCH_LIMITS = {
    80: ArchLimits(163 * 1024, 164 * 1024, 1024),  # A100
    90: ArchLimits(227 * 1024, 228 * 1024, 1024),  # H100 / H200
    100: ArchLimits(227 * 1024, 228 * 1024, 1024),  # B200
}
DEFAULT_ARCHS = (80, 90, 100)
# (name, dtype, TF32 allowed). float32 runs on tensor cores as TF32, PyTorch's default for convolutions; with
# torch.backends.cudnn.allow_tf32 off the dispatch does not choose the Triton backend (`triton_supports`)
PRECISIONS = (
    ('bf16', torch.bfloat16, True),
    ('fp16', torch.float16, True),
    ('fp32', torch.float32, True),
)
_MMA = re.compile(r'\b(HGMMA|HMMA|UTC\w*MMA)\b')


def _tool(name: str) -> Path:
    import triton
    return Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / name


def supported_archs(archs: Sequence[int] = DEFAULT_ARCHS) -> Tuple[int, ...]:
    """The architectures of `archs` the wheel's ptxas can assemble for (sm_100 needs its Blackwell ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas
    out = []
    for arch in archs:
        try:
            ok = Path(get_ptxas(arch).path).exists()
        except Exception:  # a wheel without that ptxas
            ok = False
        if ok:
            out.append(arch)
    return tuple(out)


@dataclass(frozen=True)
class DepthwiseConvCall:
    """A conv through `large_kernel_conv2d` that the Triton backend computes (`triton_fits`)."""
    channels: int
    height: int
    width: int
    kh: int
    kw: int
    bias: bool


def dispatched_depthwise_convs(model: torch.nn.Module, input_size: Sequence[int]) -> Dict[DepthwiseConvCall, List[str]]:
    """The depthwise convs `model` sends through the conv dispatch for one (C, H, W) input, in training (as
    built) and reparameterized (`timm.models.reparameterize_model`, bias folded in): {call: [module names]}.
    Runs on the meta device (a copy of the model's structure; nothing is computed)."""
    from timm.models import reparameterize_model

    from .layers.conv import DispatchConvMixin
    from .ops.dwconv import triton_fits

    found: Dict[DepthwiseConvCall, List[str]] = {}
    names = {}
    original = DispatchConvMixin._dispatch_conv

    def record(module, x, weight, bias, stride, groups):
        if triton_fits(x, weight, stride, groups):
            call = DepthwiseConvCall(x.shape[1], x.shape[2], x.shape[3], weight.shape[-2], weight.shape[-1],
                                     bias is not None)
            found.setdefault(call, []).append(names.get(id(module), type(module).__name__))
        return original(module, x, weight, bias, stride, groups)

    x = torch.empty((1, *input_size), device='meta')
    with mock.patch.object(DispatchConvMixin, '_dispatch_conv', record), torch.no_grad():
        for m in (model.train(), reparameterize_model(model.eval())):
            names.update({id(mod): n for n, mod in m.named_modules()})
            m(x)
    return found


@dataclass
class AotConfiguration:
    """One compiled kernel variant: its launch per architecture (on meta tensors; the launch options may depend on
    the architecture) and the convs and directions that use it."""
    kernel: str
    precision: str
    layout: str
    launches: Dict[int, object]  # arch -> triton_dwconv.KernelLaunch
    uses: List[str] = field(default_factory=list)

    @property
    def constexprs(self) -> Dict[str, object]:
        launch = next(iter(self.launches.values()))
        return {k: v for k, v in launch.kwargs.items() if k not in ('ACC', 'PRECISION', 'num_warps', 'maxnreg')}

    def tile(self) -> str:
        """The constexprs that set the compiled variant: images x rows x columns of the output tile (forward) or
        rows x columns of the gradient tile (kernel gradient), and the input window width."""
        c = self.constexprs
        if self.kernel == 'forward':
            return f"{c['IMGS']}x{c['BLOCK_H']}x{c['BLOCK_W']} win {c['WIN']}"
        return f"{c['BLOCK_M']}x{c['BLOCK_W']} win {c['WIN']}"

    def kernel_sizes(self) -> str:
        """The kernel sizes among the uses ('smpconv_t 31x31 on 56x56: forward' -> '31x31')."""
        sizes = {m.groups() for u in self.uses for m in re.finditer(r'\b(\d+)x(\d+)\b', u.split(' on ')[0])}
        return ', '.join(f'{h}x{w}' for h, w in sorted(sizes, key=lambda s: (int(s[0]), int(s[1]))))

    def describe(self) -> str:
        return f'{self.kernel} {self.tile()}, {self.precision}, {self.layout} (kernels {self.kernel_sizes()})'


def _jit(kernel):
    """The JITFunction of a kernel (under TRITON_INTERPRET=1 `triton.jit` made an InterpretedFunction instead)."""
    from triton.runtime.jit import JITFunction
    if isinstance(kernel, JITFunction):
        return kernel
    cache = _jit.__dict__.setdefault('cache', {})
    if kernel.fn not in cache:
        cache[kernel.fn] = JITFunction(kernel.fn, **kernel.kwargs)
    return cache[kernel.fn]


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    cache = _backend.__dict__.setdefault('cache', {})
    if arch not in cache:
        cache[arch] = make_backend(GPUTarget('cuda', arch, 32))
    return cache[arch]


def _specialize(launch, arch: int):
    """What Triton's JIT would compile for this launch on `arch`: (JITFunction, options, signature, constexprs,
    attrs), from its own binder."""
    from triton.runtime.jit import create_function_from_signature
    jit, backend = _jit(launch.kernel), _backend(arch)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, launch.kwargs, bound, specialization, options)
    return jit, options, signature, constexprs, attrs


def _compile_key(launch, arch: int) -> str:
    jit, options, signature, constexprs, attrs = _specialize(launch, arch)
    return repr((jit.fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                 sorted(options.__dict__.items())))


def _conv_launches(call: DepthwiseConvCall, dtype: torch.dtype, tf32: bool, channels_last: bool, arch: int):
    """[(direction, launch)] the backend makes for this conv on sm_`arch` (forward, input gradient, kernel
    gradient), on meta tensors (batch 2: the shape ints are not specialized)."""
    from .ops import triton_dwconv as k
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(2, call.channels, call.height, call.width, device='meta', dtype=dtype).contiguous(memory_format=fmt)
    w = torch.empty(call.channels, 1, call.kh, call.kw, device='meta', dtype=dtype)
    b = torch.empty(call.channels, device='meta', dtype=dtype) if call.bias else None
    gy = torch.empty_like(x)  # the backward reads the output gradient in x's layout (dwconv.py)
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=tf32):
        out = [('forward +bias' if call.bias else 'forward', k.forward_launch(x, w, b, torch.empty_like(x), arch))]
        if not call.bias:  # a bias is folded in by reparameterization: eval only, no gradients
            out += [('input grad', k.forward_launch(gy, w.flip(-2, -1), None, torch.empty_like(x), arch)),
                    ('kernel grad', k.weight_grad_launch(gy, x, call.kh, call.kw, arch))]
    return out


def aot_configurations(models: Optional[Iterable[str]] = None, precisions: Sequence[tuple] = PRECISIONS,
                       archs: Optional[Sequence[int]] = None) -> List[AotConfiguration]:
    """The distinct compiled variants behind every Triton launch for the depthwise large-kernel convs of
    `models` (default: every model of the package) at their default input size: forward, input gradient and
    kernel gradient, in each of `precisions`, NCHW and channels_last, for `archs` (default: `supported_archs()`).
    Launches with the same compile key on every arch are one configuration."""
    import timm

    from .models import package_models
    models = package_models() if models is None else list(models)
    archs = tuple(supported_archs() if archs is None else archs)
    configs: Dict[str, AotConfiguration] = {}
    for name in models:
        with torch.device('meta'):
            model = timm.create_model(name)
        input_size = model.pretrained_cfg['input_size']
        for call, modules in dispatched_depthwise_convs(model, input_size).items():
            where = f'{name} {call.kh}x{call.kw} on {call.height}x{call.width}'
            for prec, dtype, tf32 in precisions:
                for layout in ('NCHW', 'channels_last'):
                    per_arch = [_conv_launches(call, dtype, tf32, layout == 'channels_last', a) for a in archs]
                    for i, (direction, launch) in enumerate(per_arch[0]):
                        launches = {a: p[i][1] for a, p in zip(archs, per_arch)}
                        key = repr([_compile_key(lh, a) for a, lh in launches.items()])
                        if key not in configs:
                            kernel = 'forward' if launch.kernel.__name__ == '_dw_fwd_kernel' else 'kernel grad'
                            configs[key] = AotConfiguration(kernel, prec, layout, launches)
                        use = f'{where}: {direction}'
                        if use not in configs[key].uses:
                            configs[key].uses.append(use)
    return list(configs.values())


@dataclass
class AotReport:
    """What compiling one configuration for one architecture gave."""
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int  # bytes per block, static + dynamic
    shared_limit: int
    occupancy: float  # resident warps / the SM's maximum
    num_warps: int
    mma: Dict[str, int] = field(default_factory=dict)  # tensor-core SASS instructions by opcode (`read_sass`)
    text: bytes = field(default=b'', repr=False)  # the cubin's code section

    @property
    def tensor_core(self) -> bool:
        return sum(self.mma.values()) > 0


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> float:
    """Theoretical occupancy (resident warps / maximum) of a kernel with these resources."""
    lim = ARCH_LIMITS[arch]
    per_warp = -(-registers * 32 // lim.register_unit) * lim.register_unit
    blocks = min(lim.max_blocks_per_sm, lim.max_warps_per_sm // num_warps,
                 (lim.registers_per_sm // per_warp) // num_warps if per_warp else lim.max_blocks_per_sm)
    if shared:
        blocks = min(blocks, lim.shared_per_sm // (shared + lim.shared_reserved_per_block))
    return blocks * num_warps / lim.max_warps_per_sm


_PTXAS_USED = re.compile(r'Used (\d+) registers')
_PTXAS_SPILL = re.compile(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads')


def _cubin_sections(cubin: bytes) -> Tuple[bytes, int]:
    """(code, static shared memory bytes) of a single-kernel cubin (an ELF64 file): its .text section and the
    size of its .nv.shared section (none: 0)."""
    shoff, = struct.unpack_from('<Q', cubin, 0x28)
    entsize, num, strndx = struct.unpack_from('<HHH', cubin, 0x3a)
    sections = [struct.unpack_from('<IIQQQQIIQQ', cubin, shoff + i * entsize) for i in range(num)]
    names_at = sections[strndx][4]
    texts, shared = [], 0
    for sec in sections:
        name = cubin[names_at + sec[0]:cubin.index(b'\0', names_at + sec[0])]
        if name.startswith(b'.text.'):
            texts.append(cubin[sec[4]:sec[4] + sec[5]])
        elif name.startswith(b'.nv.shared.'):
            shared += sec[5]
    if len(texts) != 1:
        raise RuntimeError(f'expected one code section in a Triton cubin, found {len(texts)}')
    return texts[0], shared


def _compile_launch(launch, arch: int, label: str) -> AotReport:
    """Compile one launch for sm_`arch` (no GPU needed) and read its resources (ptxas -v, the cubin's sections);
    `read_sass` then counts its tensor-core instructions. Raises what Triton or ptxas raise when it does not
    compile."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    jit, options, signature, constexprs, attrs = _specialize(launch, arch)
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        # a private cache: every configuration is really compiled (and ptxas -v prints its report)
        with knobs.cache.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.cache.dir = tmp
            knobs.nvidia.dump_ptxas_log = True
            kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=_backend(arch).target,
                                    options=options.__dict__)
    text = log.getvalue()
    spill, used = _PTXAS_SPILL.search(text), _PTXAS_USED.search(text)
    if spill is None or used is None:
        raise RuntimeError(f'could not read the ptxas report of {label} on sm_{arch}:\n{text}')
    code, static_shared = _cubin_sections(kernel.asm['cubin'])
    shared = static_shared + int(kernel.metadata.shared)  # static + dynamic
    num_warps = kernel.metadata.num_warps
    registers = int(used.group(1))
    return AotReport(
        arch=arch, registers=registers, spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)),
        stack=int(spill.group(1)), shared=shared, shared_limit=ARCH_LIMITS[arch].shared_per_block,
        occupancy=occupancy(arch, registers, shared, num_warps), num_warps=num_warps, text=code)


_SASS_ADDR = re.compile(r'/\*([0-9a-f]{4,})\*/\s+(.*)')


def read_sass(reports: Sequence[AotReport]):
    """Fill each report's `mma` with the tensor-core instructions of its SASS.

    One disassembler run per architecture: the reports' code sections are disassembled together as one raw
    instruction stream (fixed 16-byte instructions, so each kernel's instructions keep their own addresses) and
    split by address; nvdisasm's start-up (about 0.2 s) would otherwise cost more than a compile."""
    by_arch: Dict[int, List[AotReport]] = {}
    for r in reports:
        by_arch.setdefault(r.arch, []).append(r)
    for arch, group in by_arch.items():
        starts, blob = [], b''
        for r in group:
            starts.append(len(blob))
            blob += r.text
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / 'code.bin'
            path.write_bytes(blob)
            sm = f'SM{arch}' + ('a' if arch >= 90 else '')  # Triton builds sm_90a / sm_100a
            sass = subprocess.run([str(_tool('nvdisasm')), '-b', sm, '-ndf', str(path)], check=True,
                                  capture_output=True, text=True).stdout
        ends = starts[1:] + [len(blob)]
        for r in group:
            r.mma = {}
        seen = 0
        for m in _SASS_ADDR.finditer(sass):
            addr = int(m.group(1), 16)
            i = bisect.bisect_right(starts, addr) - 1
            if not starts[i] <= addr < ends[i]:
                continue
            seen += 1
            op = _MMA.search(m.group(2))
            if op:
                group[i].mma[op.group(1)] = group[i].mma.get(op.group(1), 0) + 1
        if seen * 16 < len(blob):
            raise RuntimeError(f'nvdisasm read {seen} instructions of {len(blob) // 16} (sm_{arch})')


# ---- in parallel: worker processes rebuild each launch from a picklable description

def _encode(launch) -> tuple:
    args = tuple(('tensor', tuple(a.shape), tuple(a.stride()), str(a.dtype).split('.')[-1])
                 if isinstance(a, torch.Tensor) else a for a in launch.args)
    return launch.kernel.__name__, launch.grid, args, launch.kwargs


def _decode(spec):
    from .ops import triton_dwconv
    name, grid, args, kwargs = spec
    args = tuple(torch.empty_strided(a[1], a[2], dtype=getattr(torch, a[3]), device='meta')
                 if isinstance(a, tuple) and a and a[0] == 'tensor' else a for a in args)
    return triton_dwconv.KernelLaunch(getattr(triton_dwconv, name), grid, args, kwargs)


def _compile_task(task) -> AotReport:
    spec, arch, label = task
    return _compile_launch(_decode(spec), arch, label)


@contextlib.contextmanager
def _compiler_environment():
    """No TRITON_INTERPRET for the compiler processes: in a process where it is set, `triton.jit` makes interpreter
    functions and compiling their source for a GPU target fails (triton 3.8)."""
    saved = os.environ.pop('TRITON_INTERPRET', None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ['TRITON_INTERPRET'] = saved


def compile_configurations(configs: Sequence[AotConfiguration], archs: Sequence[int],
                           jobs: Optional[int] = None) -> List[List[AotReport]]:
    """[[report per arch] per configuration]: every configuration compiled for each of `archs` it has a launch for,
    in `jobs` worker processes (default: one per CPU), then the SASS read. Workers are spawned fresh, without
    TRITON_INTERPRET."""
    tasks = [(_encode(c.launches[a]), a, c.describe()) for c in configs for a in archs if a in c.launches]
    jobs = max(1, min(len(tasks), jobs or os.cpu_count() or 1))
    ctx = multiprocessing.get_context('spawn')  # a fresh interpreter: no fork of a process running torch
    with _compiler_environment(), concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        flat = iter(pool.map(_compile_task, tasks))
        reports = [[next(flat) for a in archs if a in c.launches] for c in configs]
    read_sass([r for row in reports for r in row])
    return reports


def format_table(configs: Sequence[AotConfiguration], reports: Sequence[Sequence[AotReport]]) -> List[str]:
    """The markdown table of `compile_configurations`' results: per configuration and architecture, registers per
    thread, shared memory per block, theoretical occupancy, tensor-core instructions (and spill bytes, if any)."""
    archs = [r.arch for r in reports[0]] if reports else []
    head = ['kernel', 'tile', 'dtype', 'layout', 'serves'] + [f'sm_{a}' for a in archs]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for c, row in zip(configs, reports):
        directions = sorted({u.split(': ')[1] for u in c.uses})
        cells = [c.kernel, c.tile(), c.precision, c.layout, f"{c.kernel_sizes()} ({', '.join(directions)})"]
        for r in row:
            mma = ' '.join(f'{k} x{v}' for k, v in sorted(r.mma.items())) or 'no MMA'
            spill = f', {r.spill_stores} B spilled' if r.spill_stores or r.spill_loads else ''
            cells.append(f'{r.registers} regs, {r.shared / 1024:.0f} KiB, {100 * r.occupancy:.0f}%, {mma}{spill}')
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


DOCS_BEGIN = '<!-- triton-aot table: written by `python benchmarks/triton_aot.py`, checked by `pytest -k aot` -->'
DOCS_END = '<!-- end of triton-aot table -->'


def docs_block(configs: Sequence[AotConfiguration], reports: Sequence[Sequence[AotReport]]) -> List[str]:
    """The generated part of docs/performance.md: the Triton version, then `format_table`."""
    import triton
    return [DOCS_BEGIN, '', f'triton {triton.__version__}: {len(configs)} configurations, every one compiled for '
            + ', '.join(f'sm_{r.arch}' for r in reports[0]) + '.', ''] + format_table(configs, reports) + ['', DOCS_END]


def replace_docs_block(text: str, block: Sequence[str]) -> str:
    """`text` with the lines from DOCS_BEGIN to DOCS_END replaced by `block` (ValueError if the markers are missing)."""
    lines = text.split('\n')
    if DOCS_BEGIN not in lines or DOCS_END not in lines:
        raise ValueError('the document has no triton-aot table markers')
    start, end = lines.index(DOCS_BEGIN), lines.index(DOCS_END)
    return '\n'.join(lines[:start] + list(block) + lines[end + 1:])


def tools_available() -> Optional[str]:
    """None where the AOT check can run here, else why not."""
    import importlib.util
    if importlib.util.find_spec('triton') is None:
        return 'triton is not installed'
    try:
        if not _tool('nvdisasm').exists():
            return "the triton wheel has no nvdisasm (triton/backends/nvidia/bin)"
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(80).path
    except Exception as e:  # an AMD or CPU-only triton build
        return f"triton's NVIDIA backend is not usable here: {e}"
    return None
