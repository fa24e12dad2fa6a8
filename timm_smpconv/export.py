""" Deploy a trained checkpoint: reparameterize it, check it, and write a Hugging Face-style folder.

    python -m timm_smpconv.export --checkpoint FILE --out DIR [--model NAME] [--onnx] [--img-size N]

FILE is a checkpoint of `train_imagenet.py` (timm's CheckpointSaver format: 'state_dict', 'state_dict_ema',
'args'), a plain or safetensors state dict, or the SMPConv / FlexConv authors' file. The model and its creation
arguments (model, model_kwargs, num_classes, in_chans, kernel_sizes, kernel_resize) are read from the
checkpoint's stored training arguments when it has them; the flags override them (and are needed for files
without stored arguments). The EMA weights are used when the file has them, unless --no-ema.

The command builds the trained model, reparameterizes it (timm.models.reparameterize_model), writes the deployed
model with timm's save_for_hf (config.json with the deployed creation arguments, model.safetensors), and with
--onnx an ONNX file (plain Conv nodes, dynamic batch). Then it checks the folder as a user will load it:
`timm.create_model('local-dir:DIR', pretrained=True)` and, with --onnx, an onnxruntime session on model.onnx
must give the trained model's logits on a fixed batch (standard-normal inputs of the model's input size, seed
0): to --tol (default 1e-5) and --onnx-tol (default 1e-4) relative to the largest logit. A README.md model
card lists the checks as measured. Nothing is left at DIR if a check fails.
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.models import reparameterize_model, save_for_hf

from .models._builder import _FILTERS, UnsafeCheckpointError, check_state_dict_keys, read_checkpoint

__all__ = ['ExportError', 'export_checkpoint', 'main']

# the training arguments (train_imagenet.py flags) that say how the model was created
_DATA_KEYS = ('input_size', 'img_size', 'mean', 'std', 'crop_pct', 'interpolation')


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported, or a deployed model that fails its check."""


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """The checkpoint as a dict, read with torch's safe loader (training arguments allowed) or safetensors."""
    if not os.path.isfile(path):
        raise ExportError(f'checkpoint {path!r} not found')
    try:
        ckpt = read_checkpoint(path)
    except UnsafeCheckpointError as e:
        raise ExportError(str(e)) from None
    except Exception as e:
        raise ExportError(f'could not read checkpoint {path!r} ({type(e).__name__}: {e})') from e
    if not isinstance(ckpt, dict):
        raise ExportError(f'checkpoint {path!r} holds a {type(ckpt).__name__}, not a state dict')
    return ckpt


def pick_weights(ckpt: Dict[str, Any], ema: bool = True) -> Tuple[Dict[str, torch.Tensor], str]:
    """(weights, where they came from): the EMA weights if asked for and present ('state_dict_ema' of timm's
    saver, 'model_ema' of the authors' files), else 'state_dict' / 'model', else the dict itself."""
    keys = (('state_dict_ema', 'model_ema') if ema else ()) + ('state_dict', 'model')
    for key in keys:
        if isinstance(ckpt.get(key), dict):
            return ckpt[key], key
    return ckpt, 'state dict'


def stored_creation_args(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """The training run's arguments saved with the checkpoint (an argparse Namespace or a dict), or {}."""
    args = ckpt.get('args')
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return dict(args) if isinstance(args, dict) else {}


def creation_kwargs(stored: Dict[str, Any], model: Optional[str] = None, overrides: Optional[Dict] = None
                    ) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """(model name, create_model kwargs, data config) from the stored training arguments, as train_imagenet.py
    creates its model, with `model` and `overrides` (num_classes, in_chans, kernel_sizes, kernel_resize and
    model kwargs) taking precedence."""
    name = model or stored.get('model')
    if not name:
        raise ExportError('the checkpoint does not say which model it holds: pass --model NAME')
    kwargs = dict(stored.get('model_kwargs') or {})
    if stored.get('kernel_sizes'):
        kwargs['kernel_sizes'] = tuple(stored['kernel_sizes'])
    if stored.get('kernel_resize'):
        kwargs['kernel_resize'] = stored['kernel_resize']
    in_chans = stored.get('in_chans') or (stored['input_size'][0] if stored.get('input_size') else None)
    if in_chans:
        kwargs['in_chans'] = in_chans
    if stored.get('num_classes'):
        kwargs['num_classes'] = stored['num_classes']
    kwargs.update({k: v for k, v in (overrides or {}).items() if v is not None})
    # the data config the run trained with (train_imagenet.py stores it resolved: the model's defaults with the
    # flags and the dataset's statistics applied), else the data flags it was given
    resolved = stored.get('data_config') if isinstance(stored.get('data_config'), dict) else stored
    data = {k: resolved[k] for k in _DATA_KEYS if resolved.get(k)}
    return name, kwargs, data


def _filter_fn(model: nn.Module):
    fn = _FILTERS.get(type(model))
    if fn is None:
        raise ExportError(f'{type(model).__name__} is not a timm_smpconv model: export deploys the models this package '
                          f'registers')
    return fn


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    diff = (out.float() - ref.float()).abs().max().item()
    return diff, diff / max(ref.abs().max().item(), 1e-30)


def _model_card(name: str, report: Dict[str, Any]) -> str:
    lines = ['---', 'tags:', '- timm', '- timm-smpconv', 'library_name: timm']
    if report.get('license'):
        lines.append(f'license: {report["license"]}')
    lines += ['---', f'# {name} (deployed)', '',
              f'The reparameterized form of `{report["checkpoint"]}` ({report["weights"]} weights'
              + (f', epoch {report["epoch"]}' if report.get('epoch') is not None else '') + '), exported with '
              '`python -m timm_smpconv.export`: plain convolutions with bias, no BatchNorm and no continuous-kernel '
              'layer. It runs inference only; fine-tune from the training checkpoint.', '',
              '## Check (measured when exporting)', '',
              f'Logits on a fixed batch ({report["batch"]}, standard-normal inputs, seed 0) against the trained '
              'model\'s, relative to its largest logit:', '',
              '| loaded as | max abs diff | max rel diff | tolerance |', '|---|---|---|---|']
    for row in report['checks']:
        lines.append(f'| {row["what"]} | {row["abs"]:.3g} | {row["rel"]:.3g} | {row["tol"]:g} |')
    lines += ['', f'torch {torch.__version__}, timm {timm.__version__}, timm-smpconv {report["version"]}'
              + (f', onnxruntime {report["onnxruntime"]}' if report.get('onnxruntime') else '') + '.', '',
              '## Usage', '', '```python', 'import timm, timm_smpconv', '',
              "model = timm.create_model('local-dir:PATH/TO/THIS/FOLDER', pretrained=True).eval()",
              "# after uploading the folder to the Hub: timm.create_model('hf-hub:USER/REPO', pretrained=True)",
              '```', '', 'Creation arguments (config.json `model_args`):', '', '```json',
              json.dumps(report['model_args']), '```']
    if report.get('onnx'):
        lines += ['', '`model.onnx` (input `x`, dynamic batch) runs in onnxruntime, e.g. '
                  '`onnxruntime.InferenceSession("model.onnx").run(None, {"x": images})`.']
    return '\n'.join(lines) + '\n'


def export_checkpoint(
        checkpoint: str,
        out: str,
        model: Optional[str] = None,
        overrides: Optional[Dict[str, Any]] = None,
        ema: bool = True,
        onnx: bool = False,
        img_size: Optional[int] = None,
        batch_size: int = 2,
        tol: float = 1e-5,
        onnx_tol: float = 1e-4,
) -> Dict[str, Any]:
    """Export `checkpoint` to the folder `out` (see the module docstring); returns the report the model card lists.
    Raises ExportError (and leaves nothing at `out`) when a check fails or the input is unusable."""
    from . import __version__
    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f'--out {out!r} exists and is not an empty folder: choose another or remove it')
    ckpt = load_checkpoint_file(checkpoint)
    weights, source = pick_weights(ckpt, ema)
    name, kwargs, data = creation_kwargs(stored_creation_args(ckpt), model, overrides)
    try:
        trained = timm.create_model(name, **kwargs)
    except Exception as e:
        raise ExportError(f'could not create {name} with {kwargs}: {e}') from e
    if trained.inference_mode:
        raise ExportError('the model was created with inference_mode=True: export takes a training checkpoint')
    try:
        state_dict = _filter_fn(trained)(dict(weights), trained)  # the authors' layouts converted
        check_state_dict_keys(state_dict, trained, adaptable=False)  # the classifier too: export adapts nothing
        trained.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as e:
        fix = f': pass --num-classes {e.num_classes}' if getattr(e, 'num_classes', None) else ''
        raise ExportError(f'the checkpoint does not fit {name} created with {kwargs}: {e}{fix}') from e
    trained.eval()
    deployed = reparameterize_model(trained)
    if img_size:
        data['img_size'] = img_size
        data.pop('input_size', None)

    out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.absolute().parent))
    try:
        save_for_hf(deployed, tmp, safe_serialization=True, data_config=data)
        config = json.loads((tmp / 'config.json').read_text())
        input_size = tuple(config['pretrained_cfg']['input_size'])
        x = torch.randn((batch_size,) + input_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = trained(x)
            loaded = timm.create_model(f'local-dir:{tmp}', pretrained=True).eval()
            checks = [dict(what='PyTorch, `local-dir:` (this folder)', out=loaded(x), tol=tol)]
        report = dict(checkpoint=os.path.basename(checkpoint), weights=source, epoch=ckpt.get('epoch'),
                      batch=' x '.join(map(str, x.shape)), model_args=config.get('model_args', {}),
                      license=config['pretrained_cfg'].get('license'), version=__version__, onnx=onnx)
        if onnx:
            import onnxruntime as ort
            path = tmp / 'model.onnx'
            with torch.no_grad():
                torch.onnx.export(loaded, (x,), str(path), dynamo=True, input_names=['x'], output_names=['logits'],
                                  dynamic_shapes=({0: torch.export.Dim('batch')},), external_data=False,
                                  verbose=False)
            sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
            checks.append(dict(what='onnxruntime, `model.onnx`', tol=onnx_tol,
                               out=torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])))
            report['onnxruntime'] = ort.__version__
        report['checks'] = []
        for c in checks:
            diff, rel = _rel_err(c['out'], ref)
            report['checks'].append(dict(what=c['what'], abs=diff, rel=rel, tol=c['tol']))
            if not rel <= c['tol']:
                raise ExportError(f'{c["what"]}: the deployed logits differ from the trained model\'s by {rel:.3g} '
                                  f'(relative), more than {c["tol"]:g}')
        (tmp / 'README.md').write_text(_model_card(name, report))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _kv(text: str):
    import yaml
    key, sep, value = text.partition('=')
    if not sep:
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
    return key, yaml.safe_load(value)


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog='python -m timm_smpconv.export', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='training checkpoint (ours, a state dict, the authors\')')
    parser.add_argument('--out', required=True, help='folder to write (must not exist or be empty)')
    parser.add_argument('--model', default=None, help='model name (default: the one stored in the checkpoint)')
    parser.add_argument('--onnx', action='store_true', help='also write model.onnx and check it in onnxruntime')
    parser.add_argument('--img-size', type=int, default=None,
                        help='input size of the check and of config.json (default: the training run\'s, else the '
                             'model\'s)')
    parser.add_argument('--no-ema', action='store_true', help='export the raw weights, not the EMA weights')
    parser.add_argument('--num-classes', type=int, default=None, help='default: the stored training arguments\'')
    parser.add_argument('--in-chans', type=int, default=None, help='default: the stored training arguments\'')
    parser.add_argument('--kernel-sizes', type=int, nargs='+', default=None,
                        help='SMP kernel sizes the model renders at (default: the stored training arguments\')')
    parser.add_argument('--model-kwargs', nargs='*', default=[], type=_kv, metavar='KEY=VALUE',
                        help='create_model kwargs over the stored ones, values in YAML (e.g. seq_len=64)')
    parser.add_argument('--batch-size', type=int, default=2, help='size of the fixed check batch')
    parser.add_argument('--tol', type=float, default=1e-5, help='largest relative logit difference, PyTorch')
    parser.add_argument('--onnx-tol', type=float, default=1e-4, help='largest relative logit difference, onnxruntime')
    args = parser.parse_args(argv)
    overrides = dict(args.model_kwargs)
    overrides.update(num_classes=args.num_classes, in_chans=args.in_chans,
                     kernel_sizes=tuple(args.kernel_sizes) if args.kernel_sizes else None)
    try:
        report = export_checkpoint(
            args.checkpoint, args.out, model=args.model, overrides=overrides, ema=not args.no_ema, onnx=args.onnx,
            img_size=args.img_size, batch_size=args.batch_size, tol=args.tol, onnx_tol=args.onnx_tol)
    except ExportError as e:
        parser.exit(2, f'export failed: {e}\n')
    print(f'wrote {args.out}: config.json, model.safetensors{", model.onnx" if args.onnx else ""}, README.md')
    for row in report['checks']:
        print(f'  {row["what"]}: max abs diff {row["abs"]:.3g}, max rel diff {row["rel"]:.3g} (tolerance {row["tol"]:g})')
    print(f"  load it with timm.create_model('local-dir:{args.out}', pretrained=True) after import timm_smpconv")
    return report


if __name__ == '__main__':
    main()
