""" Sequence models on long sequences: training step of smp_tcn (and flextcn_6) against a plain dilated TCN.

    python benchmarks/sequence.py [--threads 2] [--reps 2] [--out ...] [--smoke]

sMNIST length (784 steps, batch 64, the paper's batch) and raw 16 kHz audio length (16,000 steps, batch
32), one input channel, 10 classes; forward + backward + Adam step, median of --reps steps after one
warm-up, all models timed back to back in each round (so that load drifting on a shared machine hits them
alike). The baseline is the usual dilated TCN (Bai et al.
2018: two causal convs of 7 taps per block, dilation doubling per block, ReLU, 1x1 shortcut), 8 blocks of
width 56 (331,250 parameters, receptive field 3,061 steps), built here because timm has no 1-D model. Writes
benchmarks/results/sequence.md.
"""
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from harness import bench_parser, interleaved_medians, parse_args, results_head, train_step, write_results

import timm_smpconv  # noqa: F401
from timm_smpconv.ops import select_causal_backend


class DilatedTCN(nn.Module):
    """The plain TCN baseline: blocks of two dilated causal 7-tap convs, ReLU, 1x1 shortcut; last-step head."""

    def __init__(self, in_chans=1, width=56, depth=8, k=7, num_classes=10):
        super().__init__()
        self.k = k
        self.convs = nn.ModuleList()
        self.shortcuts = nn.ModuleList()
        prev = in_chans
        for i in range(depth):
            self.convs.append(nn.ModuleList([nn.Conv1d(prev, width, k, dilation=2 ** i),
                                             nn.Conv1d(width, width, k, dilation=2 ** i)]))
            self.shortcuts.append(nn.Conv1d(prev, width, 1) if prev != width else nn.Identity())
            prev = width
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        for (c1, c2), sc in zip(self.convs, self.shortcuts):
            pad = (self.k - 1) * c1.dilation[0]
            h = F.relu(c1(F.pad(x, (pad, 0))))
            h = F.relu(c2(F.pad(h, (pad, 0))))
            x = F.relu(h + sc(x))
        return self.head(x[:, :, -1])


def main(argv=None):
    args = parse_args(bench_parser(__doc__, 'sequence.md', reps=2), argv)
    lines = results_head('Sequence models, training step (s, medians)', 'python benchmarks/sequence.py', args)
    runs = ((784, 64, ['smp_tcn', 'flextcn_6']), (16000, 32, ['smp_tcn']))
    if args.smoke:
        runs = ((64, 2, ['smp_tcn', 'flextcn_6']),)
    lines += ['| length | batch | model | params | conv path of the long kernels | step s | steps/s | vs dilated TCN |',
              '|---|---|---|---|---|---|---|---|']
    for length, batch, names in runs:
        torch.manual_seed(0)
        x = torch.randn(batch, 1, length)
        y = torch.randint(0, 10, (batch,))
        models = {n: timm.create_model(n, seq_len=length, in_chans=1, num_classes=10) for n in names}
        models['dilated TCN'] = DilatedTCN()
        steps = {n: train_step(m, x, y, torch.optim.Adam(m.parameters(), lr=1e-4)) for n, m in models.items()}
        t = interleaved_medians(steps, 1, args.reps)
        base = t['dilated TCN']
        for n, m in models.items():
            s = t[n]
            path = select_causal_backend(x, torch.empty(1, 1, length)) if n != 'dilated TCN' else 'direct (7 taps)'
            lines.append(f'| {length} | {batch} | {n} | {sum(p.numel() for p in m.parameters()):,} | {path} | '
                         f'{s:.3f} | {1 / s:.2f} | {s / base:.2f}x |')
            print(lines[-1], flush=True)
    write_results(args.out, lines)


if __name__ == '__main__':
    main()
