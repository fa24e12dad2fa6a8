""" Parameter and FLOP counts with fvcore, split the way the SMPConv paper reports them.

    python -m timm_smpconv.flops --model smpconv_t --img-size 224 [--reparam] [--batch-size 1]

fvcore counts one multiply-add as one FLOP (as the papers' tables do). The report separates:
  * conv: all convolutions, per image (the paper's GFLOPs column: 5.71 for SMPConv-T);
  * kernel generation: rendering the SMP kernels (a matmul per SMP layer) or running the FlexConv /
    CKConv kernel networks (MAGNet, SIREN) and their masks, paid once per forward whatever the batch size,
    and gone after reparameterization;
  * batch norm, fully connected layers (the classifier), and the total.
"""
import argparse
import logging
from typing import Dict, Optional

import torch
import torch.nn as nn
from timm.models import reparameterize_model

from ._fvcore import FlopCountAnalysis  # without fvcore's import-time FutureWarning
from .layers.flexconv import FlexConv2d
from .layers.smp_conv import _SMPConvNd
from .models import create_model_or_exit

__all__ = ['count_flops', 'main']


def count_flops(
        model: nn.Module,
        img_size: int = 224,
        batch_size: int = 1,
        in_chans: Optional[int] = None,
        seq_len: Optional[int] = None,
) -> Dict[str, float]:
    """Count FLOPs of one forward at (batch_size, in_chans, img_size, img_size), or of a sequence model at
    (batch_size, in_chans, seq_len) when `seq_len` is given.

    Returns a dict with 'params', 'conv' (per image), 'kernel_gen' (per forward), 'norm' (per image),
    'linear' (per image: fully connected layers, the classifier), 'other' (per image) and 'total' (the whole forward), all in FLOPs (MACs).
    """
    in_chans = in_chans or getattr(model, 'in_chans', 3)
    p = next(model.parameters())
    shape = (batch_size, in_chans) + ((seq_len,) if seq_len else (img_size, img_size))
    x = torch.zeros(shape, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    logging.getLogger('fvcore').setLevel(logging.ERROR)
    with torch.no_grad():
        fca = FlopCountAnalysis(model, x)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
        by_op = fca.by_operator()
        total = fca.total()
        by_mod_op = fca.by_module_and_operator()
    model.train(was_training)
    # kernel generation: everything a continuous conv (SMP, FlexConv / CKConv and their 1-D forms) does
    # besides the convolution itself, whatever op fvcore files it under (the kernel networks are linears)
    gen_names = [n for n, m in model.named_modules() if isinstance(m, (_SMPConvNd, FlexConv2d))]
    gen_ops: Dict[str, float] = {}
    for n in gen_names:
        for op, v in by_mod_op.get(n, {}).items():
            if op != 'conv':
                gen_ops[op] = gen_ops.get(op, 0) + v
    kernel_gen = sum(gen_ops.values())
    conv = by_op.get('conv', 0)
    norm = sum(v - gen_ops.get(op, 0) for op, v in by_op.items() if op.endswith('_norm'))
    linear = sum(by_op.get(op, 0) - gen_ops.get(op, 0) for op in ('linear', 'addmm'))
    other = total - conv - norm - linear - kernel_gen
    return {
        'params': sum(p.numel() for p in model.parameters()),
        'conv': conv / batch_size,
        'kernel_gen': kernel_gen,
        'norm': norm / batch_size,
        'linear': linear / batch_size,
        'other': other / batch_size,
        'total': total,
    }


def format_report(name: str, counts: Dict[str, float], img_size: int, batch_size: int, reparam: bool,
                  seq_len: Optional[int] = None) -> str:
    g = 1e9
    size = f'{seq_len} steps' if seq_len else f'{img_size}x{img_size}'
    lines = [
        f'{name} at {size}{" (reparameterized)" if reparam else ""}, fvcore, 1 FLOP = 1 multiply-add',
        f'  params:                        {counts["params"]:,}',
        f'  conv GFLOPs per image:         {counts["conv"] / g:.4f}',
        f'  kernel generation GFLOPs:      {counts["kernel_gen"] / g:.4f}  (per forward, any batch size)',
        f'  batch norm GFLOPs per image:   {counts["norm"] / g:.4f}',
        f'  linear GFLOPs per image:       {counts["linear"] / g:.4f}  (fully connected layers, classifier)',
    ]
    if abs(counts['other']) > 0:
        lines.append(f'  other GFLOPs per image:        {counts["other"] / g:.4f}')
    lines.append(f'  total GFLOPs (batch {batch_size}):      {counts["total"] / g:.4f}')
    return '\n'.join(lines)


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(prog='python -m timm_smpconv.flops', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='smpconv_t', help='timm model name (ours or any timm model)')
    parser.add_argument('--img-size', type=int, default=224, help='square input size')
    parser.add_argument('--seq-len', type=int, default=None,
                        help='sequence models (smp_tcn, flextcn_*): sequence length (default: the model\'s seq_len)')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--num-classes', type=int, default=None, help='default: the model\'s')
    parser.add_argument('--reparam', action='store_true', help='count the reparameterized (deploy) model')
    args = parser.parse_args(argv)
    kwargs = {} if args.num_classes is None else {'num_classes': args.num_classes}
    model = create_model_or_exit(parser, args.model, **kwargs)
    if args.reparam:
        model = reparameterize_model(model.eval())
    seq_len = args.seq_len or getattr(model, 'seq_len', None)
    counts = count_flops(model, args.img_size, args.batch_size, seq_len=seq_len)
    print(format_report(args.model, counts, args.img_size, args.batch_size, args.reparam, seq_len))
    return counts


if __name__ == '__main__':
    main()
