""" fvcore, imported once for the package and its tools: FLOP counting (flops.py) and PreciseBN (the trainer).

Importing fvcore.nn scripts one of its losses with torch.jit.script, which torch deprecates with a FutureWarning:
nothing a user can act on, so it is not shown.
"""
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.precise_bn import update_bn_stats

__all__ = ['FlopCountAnalysis', 'update_bn_stats']
