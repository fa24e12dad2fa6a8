""" Training memory and launch counts, device-independent: what a training forward keeps for the backward and how
many aten ops a training step dispatches, against timm's convnext_tiny; and what keeping less costs in step time.

    python benchmarks/memory.py [--threads 2] [--rounds 7] [--out ...] [--smoke]

* Kept for the backward (`timm_smpconv.memory.saved_activation_bytes`): unique storages saved by the autograd
  graph of one training forward, parameters excluded, per image (batch 4 at 224 px; CIFAR models batch 8 at
  32 px), fp32 and under bfloat16 autocast, NCHW and channels_last; by layer type for smpconv_t.
* Forms of our models (`model.set_recompute(enable, fft_spectra)`): 'plain' keeps every result as PyTorch's ops
  save them (the code before recompute), 'pointwise' recomputes BatchNorm / ReLU / GELU / dropout / sum results
  from the conv outputs in the backward (the memory saving, off by default), 'lean' also drops the FFT spectra.
* aten ops of forward + loss + backward (`count_aten_ops`), batch 8 (32 px CIFAR, 224 px ImageNet); the CIFAR
  models also as before the batched kernel generation ('per-layer kernels').
* Step time: forward + backward + SGD step of each form by the wall clock, interleaved in one process with a
  baseline (median of per-round ratios): smpconv_t at batch 8 / 224 px against convnext_tiny, the CIFAR models at
  batch 64 / 32 px against their kernels generated layer by layer (the code before the batched generation). Wall
  clock, not the process's CPU time: with two threads CPU time is not step time. Run it on a quiet machine.
Writes benchmarks/results/memory.md.
"""
import contextlib
import statistics
from unittest import mock

import timm
import torch
import torch.nn.functional as F
from harness import SMOKE_NOTE, bench_parser, interleaved_times, machine_line, model_kwargs, parse_args, positive_int, write_results

import timm_smpconv  # noqa: F401
from timm_smpconv.layers import kernel_bank
from timm_smpconv.memory import count_aten_ops, saved_activation_bytes

FORMS = {'plain': (False, False), 'pointwise': (True, False), 'lean': (True, True)}
IMAGENET = ['smpconv_t', 'smpconv_mobile31']
REFERENCES = ['convnext_tiny', 'resnet50']
CIFAR = ['flexnet_16', 'flexnet_16@grown', 'smp_flexnet_16', 'ckcnn_16']
CIFAR_ARCHS = {n.split('@')[0] for n in CIFAR}
SETTINGS = [('fp32', False, False), ('fp32', False, True), ('bf16', True, False), ('bf16', True, True)]
MIB = 2 ** 20


def _model(name: str, smoke: bool):
    arch = name.split('@')[0]
    torch.manual_seed(0)
    model = timm.create_model(arch, **model_kwargs(arch, smoke)).train()
    if name.endswith('@grown'):  # masks fully grown: 33 x 33 kernels, as in a trained FlexNet
        with torch.no_grad():
            for m in model.modules():
                if getattr(m, 'mask_params', None) is not None:
                    m.mask_params[:, 1].fill_(1.0)
    return model


def _input(name: str, batch: int, smoke: bool, channels_last: bool = False):
    cifar = name.split('@')[0] in CIFAR_ARCHS
    size = (16 if smoke else 32) if cifar else (64 if smoke else 224)
    x = torch.randn(batch, 3, size, size)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _kept(model, name, batch, smoke, amp, channels_last):
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return saved_activation_bytes(model, _input(name, batch, smoke, channels_last), amp)


def _forms(model):
    return FORMS if hasattr(model, 'set_recompute') else {'plain': None}


def memory_tables(smoke: bool):
    batch = 2 if smoke else 4
    rows, per_image, by_type = [], {}, {}
    for name in IMAGENET + REFERENCES:
        model = _model(name, smoke)
        for form, args in _forms(model).items():
            if args:
                model.set_recompute(*args)
            cells = []
            for label, amp, cl in SETTINGS:
                r = _kept(model, name, batch, smoke, amp, cl)
                per_image[(name, form, label, cl)] = r.per_image
                cells.append(r.per_image / MIB)
                if label == 'fp32' and not cl:
                    by_type[(name, form)] = {k: v / r.batch / MIB for k, v in r.by_type.items()}
            rows.append((name, form, cells))
    ref = {(label, cl): per_image[('convnext_tiny', 'plain', label, cl)] for label, _, cl in SETTINGS}
    table = ['| model | form | fp32 NCHW | fp32 channels_last | bf16 NCHW | bf16 channels_last | '
             'ratio to convnext_tiny (fp32 NCHW / CL, bf16 NCHW / CL) |', '|---|---|---|---|---|---|---|']
    for name, form, cells in rows:
        ratios = [per_image[(name, form, label, cl)] / ref[(label, cl)] for label, _, cl in SETTINGS]
        table.append(f'| {name} | {form} | ' + ' | '.join(f'{c:.1f}' for c in cells) + ' | '
                     + ' / '.join(f'{r:.2f}x' for r in ratios) + ' |')
    kinds = sorted({k for (n, _), d in by_type.items() if n in ('smpconv_t', 'convnext_tiny') for k in d},
                   key=lambda k: -by_type[('smpconv_t', 'plain')].get(k, 0) - by_type[('convnext_tiny', 'plain')].get(k, 0))
    cols = [('smpconv_t', f) for f in FORMS] + [('convnext_tiny', 'plain')]
    breakdown = ['| layer type | ' + ' | '.join(f'{n} {f}' for n, f in cols) + ' |', '|---|' + '---|' * len(cols)]
    for k in kinds:
        breakdown.append(f'| {k} | ' + ' | '.join(f'{by_type[c].get(k, 0):.1f}' for c in cols) + ' |')
    breakdown.append('| total | ' + ' | '.join(f'{sum(by_type[c].values()):.1f}' for c in cols) + ' |')
    return table, breakdown


def cifar_table(smoke: bool):
    batch = 2 if smoke else 8
    table = ['| model | form | fp32 | bf16 |', '|---|---|---|---|']
    for name in CIFAR:
        model = _model(name, smoke)
        for form, args in _forms(model).items():
            model.set_recompute(*args)
            cells = [_kept(model, name, batch, smoke, amp, False).per_image / MIB for amp in (False, True)]
            table.append(f'| {name} | {form} | {cells[0]:.2f} | {cells[1]:.2f} |')
    return table


class _PerLayer(kernel_bank.batched_kernels):
    """The kernel generation before batching: every layer its own."""

    def __init__(self, layers, enabled=True):
        super().__init__(layers, enabled=False)


def op_table(smoke: bool):
    table = ['| model | form | aten ops per training step (forward + loss + backward) |', '|---|---|---|']
    for name in ['flexnet_16', 'smp_flexnet_16', 'ckcnn_16', 'convnext_tiny', 'smpconv_t']:
        model = _model(name, smoke)
        x = _input(name, 8 if not smoke else 2, smoke)
        y = torch.randint(0, 10, (x.shape[0],))

        def step():
            F.cross_entropy(model(x), y).backward()

        forms = [('default', None)]
        if name in ('flexnet_16', 'smp_flexnet_16', 'ckcnn_16'):
            forms = [('per-layer kernels (before)', 'per-layer'), ('default (batched kernels)', None),
                     ('pointwise recompute', (True, False))]
        elif name == 'smpconv_t':
            forms = [('default (plain)', (False, False)), ('pointwise recompute', (True, False))]
        for label, form in forms:
            if isinstance(form, tuple):
                model.set_recompute(*form)
            patch = mock.patch('timm_smpconv.models.flexnet.batched_kernels', _PerLayer) if form == 'per-layer' \
                else mock.patch.object(kernel_bank, '_state', kernel_bank._state)
            with patch:
                step()
                n = count_aten_ops(step)
            table.append(f'| {name} | {label} | {n:,} |')
            if isinstance(form, tuple):
                model.set_recompute(False)
    return table


def timing_table(smoke: bool, rounds: int):
    """Training-step time of each form, by the wall clock, interleaved in one process with the model's baseline
    (smpconv_t: timm's convnext_tiny; the FlexNets: their kernels generated layer by layer, the code before the
    batched generation), median of the per-round ratios."""
    table = ['| model | memory format | default s | baseline | default / baseline | pointwise / baseline | '
             'lean / baseline | pointwise / default | lean / default |', '|---|---|---|---|---|---|---|---|---|']
    for name, fmt, batch in [('smpconv_t', 'nchw', 8), ('smpconv_t', 'channels_last', 8), ('smp_flexnet_16', 'nchw', 64),
                             ('flexnet_16', 'nchw', 64), ('flexnet_16@grown', 'nchw', 64)]:
        cifar = name.split('@')[0] in CIFAR_ARCHS
        base_name = name if cifar else 'convnext_tiny'
        models = {name: _model(name, smoke)}
        if not cifar:
            models[base_name] = _model(base_name, smoke)
        x = _input(name, 2 if smoke else batch, smoke, fmt == 'channels_last')
        if fmt == 'channels_last':
            models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
        y = torch.randint(0, 10, (x.shape[0],))
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-6) for k, m in models.items()}

        def step(key, recompute=None, per_layer=False):
            model, opt = models[key], opts[key]

            def run():
                if recompute is not None:
                    model.set_recompute(*recompute)
                opt.zero_grad(set_to_none=True)
                with mock.patch('timm_smpconv.models.flexnet.batched_kernels', _PerLayer) if per_layer \
                        else contextlib.nullcontext():
                    F.cross_entropy(model(x), y).backward()
                opt.step()
            return run

        fns = {'baseline': step(base_name, FORMS['plain'], per_layer=True) if cifar else step(base_name),
               **{f: step(name, FORMS[f]) for f in ('plain', 'pointwise', 'lean')}}
        t = interleaved_times(fns, 1, rounds)

        def ratio(a, b):
            return statistics.median(x / y for x, y in zip(t[a], t[b]))
        base_label = 'per-layer kernels' if cifar else 'convnext_tiny'
        table.append(f"| {name} | {fmt} | {statistics.median(t['plain']):.3f} | {base_label} | "
                     f"{ratio('plain', 'baseline'):.2f}x | {ratio('pointwise', 'baseline'):.2f}x | "
                     f"{ratio('lean', 'baseline'):.2f}x | {ratio('pointwise', 'plain'):.3f}x | {ratio('lean', 'plain'):.3f}x |")
        print(table[-1], flush=True)
    return table


def main(argv=None):
    parser = bench_parser(__doc__, 'memory.md')
    parser.add_argument('--rounds', type=positive_int, default=7, help='interleaved timing rounds (default: 7)')
    args = parse_args(parser, argv)
    rounds = 1 if args.smoke else args.rounds
    table, breakdown = memory_tables(args.smoke)
    print('\n'.join(table), flush=True)
    cifar = cifar_table(args.smoke)
    ops = op_table(args.smoke)
    print('\n'.join(ops), flush=True)
    timing = timing_table(args.smoke, rounds)
    lines = ['# Training memory and launch counts (CPU, device-independent)' + (SMOKE_NOTE if args.smoke else ''), '',
             machine_line('python benchmarks/memory.py', args.threads), '',
             '## Kept for the backward, MiB per image (batch 4, 224 px)', '',
             'Unique storages saved by the autograd graph of one training forward, parameters excluded, divided by '
             'the batch (what is kept once per step, such as autocast\'s bf16 weight copies and FFT kernel spectra, '
             'included). Forms: plain = every result kept (the default); pointwise = BatchNorm / ReLU / GELU outputs '
             'recomputed from the conv outputs in the backward (the memory saving: `set_recompute(True)`); lean = pointwise '
             'and the FFT convs\' input spectra dropped (`set_recompute(True, fft_spectra=True)`).', ''] + table + [
             '', '## By layer type: smpconv_t and convnext_tiny, fp32 NCHW, MiB per image', '',
             'Bytes attributed to the innermost module running when a storage was first saved.', ''] + breakdown + [
             '', '## CIFAR models, MiB per image (batch 8, 32 px)', '',
             'flexnet_16 as initialised (small cropped kernels, direct convs) and with grown masks (33 x 33 kernels, '
             'FFT convs). Their default is plain: the FFT spectra are most of what they keep.', ''] + cifar + [
             '', '## aten ops per training step (batch 8; CIFAR at 32 px, ImageNet at 224 px)', '',
             'Targets: flexnet_16 <= 2,000, smp_flexnet_16 <= 900.', ''] + ops + [
             '', f'## Training step time by form (wall clock, interleaved, median of {rounds} per-round ratios)', '',
             'Forward + backward + SGD step, timed by the wall clock with the baseline in the same rounds (smpconv_t '
             'at batch 8 against convnext_tiny; the CIFAR models at batch 64 against their own code before the '
             'batched kernel generation, every layer generating its kernel). default = every result kept (the '
             'models\' default: `set_recompute(False)`); pointwise = the memory saving, `set_recompute(True)`; lean = '
             '`set_recompute(True, fft_spectra=True)`.', ''] + timing
    print(f'wrote {write_results(args.out, lines)}')


if __name__ == '__main__':
    main()
