"""Fold a sweep of torchvision, timm and fastai architectures with randomised BN statistics.

Each model must fold with outputs matching to float32 rounding (1e-5 of the output's largest magnitude), every
BN left must be one that cannot be folded exactly (the count is reasoned from the architecture, below), and across
the sweep fastfold must leave fewer BN in place than `torch.fx.experimental.optimization.fuse`.
"""
import warnings
import pytest, torch, torchvision, timm
from torch import nn
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse
from fastai.vision.all import xresnet18, xresnet50, create_vision_model, create_unet_model
from fastai.tabular.model import TabularModel
from fastfold.layers import bn_layers, is_bn
from fastfold.fold import BN_Folder, randomize_bn

pytestmark = pytest.mark.slow

def tv(name, **kw): return lambda: getattr(torchvision.models, name)(weights=None, **kw)
def tm(name): return lambda: timm.create_model(name, pretrained=False)
img = lambda s=64: torch.randn(2, 3, s, s)

# name: (build, sample input, BN that must be left, why they must be left)
ZOO = {
    'resnet18': (tv('resnet18'), img(), 0, ''),
    'resnet50': (tv('resnet50'), img(), 0, ''),
    'mobilenet_v2': (tv('mobilenet_v2'), img(), 0, ''),
    'mobilenet_v3_small': (tv('mobilenet_v3_small'), img(), 0, ''),
    'efficientnet_b0': (tv('efficientnet_b0'), img(), 0, ''),
    'regnet_y_400mf': (tv('regnet_y_400mf'), img(), 0, ''),
    # every dense layer's norm1 (6+12+24+16), every transition's norm (3) and norm5 read a torch.cat
    'densenet121': (tv('densenet121'), img(), 58+3+1, 'cat'),
    'vgg11_bn': (tv('vgg11_bn'), img(32), 0, ''),
    'googlenet': (tv('googlenet', aux_logits=False, init_weights=False), img(), 0, ''),
    'inception_v3': (tv('inception_v3', aux_logits=False, init_weights=False), img(96), 0, ''),
    'shufflenet_v2_x0_5': (tv('shufflenet_v2_x0_5'), img(), 0, ''),
    'mnasnet0_5': (tv('mnasnet0_5'), img(), 0, ''),
    'timm_resnet18d': (tm('resnet18d'), img(), 0, ''),
    'timm_efficientnet_b0': (tm('efficientnet_b0'), img(), 0, ''),
    'timm_mobilenetv3_small_100': (tm('mobilenetv3_small_100'), img(), 0, ''),
    'timm_regnety_002': (tm('regnety_002'), img(), 0, ''),
    'timm_cspresnet50': (tm('cspresnet50'), img(), 0, ''),
    'timm_rexnet_100': (tm('rexnet_100'), img(), 0, ''),
    # DPN's BN-act-conv blocks: the BN opening each block reads a pool, a sum or a cat of them (25), and the two whose
    # input a conv gives (pre-activation, after a grouped conv) hold their activation, which must come before the next conv
    'timm_dpn68': (tm('dpn68'), img(), 27, ('not a foldable layer', 'activation inside, which must come before the conv')),
    'xresnet18': (lambda: xresnet18(n_out=10), img(), 0, ''),
    'xresnet50': (lambda: xresnet50(n_out=10), img(), 0, ''),
    # body BNs follow convs; the head's BatchNorm1d -> Dropout -> Linear fold forward
    'vision_learner_resnet18': (lambda: create_vision_model(torchvision.models.resnet18, 5, pretrained=False), img(), 0, ''),
    # UnetBlock's `bn` normalises a hooked encoder output (4), and the BN after the encoder reads a ReLU (1)
    'unet_learner_resnet18': (lambda: create_unet_model(torchvision.models.resnet18, 3, (64, 64), pretrained=False), img(), 5, ''),
    # bn_cont normalises the continuous inputs, which are then joined to the embeddings: it folds into their columns of the first Linear
    'tabular_learner': (lambda: TabularModel([(10, 4), (7, 3)], 5, 2, [20, 10]),
                        (torch.randint(0, 7, (4, 2)), torch.randn(4, 5)), 0, ''),
    # MixedConv2d joins one conv per channel split with a cat: each conv takes its slice of the BN after it
    'timm_mixnet_s': (tm('mixnet_s'), img(), 0, ''),
}

def fx_bn_left(model, sample):
    "BN left by fx's `fuse`: BN modules still called, plus BN inlined as functional calls (e.g. timm's BatchNormAct2d)"
    gm = fuse(model)
    mods = dict(gm.named_modules())
    return sum(1 for n in gm.graph.nodes if (n.op == 'call_module' and is_bn(mods[n.target])) or
               (n.op == 'call_function' and n.target in (F.batch_norm, torch.batch_norm)))

RESULTS = {}

@pytest.mark.parametrize('name', list(ZOO))
def test_zoo_model_folds(name):
    build, sample, n_left, why = ZOO[name]
    torch.manual_seed(0)
    model = randomize_bn(build()).eval()
    args = sample if isinstance(sample, tuple) else (sample,)
    with torch.no_grad(): before = model(*args)
    folder = BN_Folder(rtol=1e-5) # raises FoldCheckError if outputs differ by more than 1e-5 of the largest output
    folded = folder.fold(model, sample=sample)
    rep = folder.report
    assert type(folded) is type(model)
    assert len(bn_layers(folded)) == n_left == len(rep.left), rep
    assert len(rep.folded) == len(bn_layers(model)) - n_left
    assert all(any(w in l.reason for w in (why if isinstance(why, tuple) else (why,))) for l in rep.left), rep
    with torch.no_grad(): assert torch.equal(model(*args), before) # the input model is untouched
    try: fx_left = fx_bn_left(model, sample)
    except Exception as e: fx_left = None
    RESULTS[name] = (len(bn_layers(model)), len(bn_layers(folded)), fx_left)

def test_zoo_beats_fx_fuse():
    "Across the sweep fastfold leaves fewer BN than fx's fuse, which also fails to trace some models"
    if len(RESULTS) < len(ZOO): pytest.skip('needs the whole sweep to have run')
    total = sum(n for n,_,_ in RESULTS.values())
    ours = sum(l for _,l,_ in RESULTS.values())
    fx = sum(n if f is None else f for n,_,f in RESULTS.values()) # a model fuse can't trace keeps all its BN
    untraced = [k for k,(_,_,f) in RESULTS.items() if f is None]
    print(f'\nBN in sweep: {total}; left by fastfold: {ours} ({ours/total:.0%}); left by fx fuse: {fx} ({fx/total:.0%}); '
          f'fx fuse cannot trace: {untraced}')
    assert ours < fx
    for k,(n,l,f) in RESULTS.items(): assert f is None or l <= f, k
