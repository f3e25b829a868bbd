"""Property-based tests: random layer configurations fold exactly.

For random Conv/ConvTranspose (1-3d, groups, stride, dilation, padding and padding modes, bias or not) and Linear
layers followed by a BN with random statistics (affine or not), random `BN -> Dropout -> Linear` heads, a BN before
random convs (left when the conv pads zeros) and a BN after a `cat` of random convs, the folded float32 model must
match a float64 evaluation of the original to float32 rounding. A Linear's BN folds where its input is shown 2-D (by a
`Flatten` or by the sample); on `(N, C, L)` it is left, and the model is unchanged, also when `L == C`.
"""
import copy
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from fastfold.layers import bn_layers
from fastfold.fold import BN_Folder, randomize_bn

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

def assert_folds_exactly(model, x, seed, sample=None):
    randomize_bn(model, seed=seed).eval()
    ref = copy.deepcopy(model).double()
    folded = BN_Folder().fold(model, sample)
    assert not bn_layers(folded)
    with torch.no_grad(): want,got = ref(x.double()),folded(x).double()
    tol = 1e-5 * want.abs().max().item() + 1e-6
    assert (want - got).abs().max().item() <= tol

@st.composite
def conv_bn(draw):
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups*draw(st.integers(1, 3)), groups*draw(st.integers(1, 3))
    k = draw(st.integers(1, 3)); stride = draw(st.integers(1, 2)); dilation = draw(st.integers(1, 2))
    bias = draw(st.booleans()); affine = draw(st.booleans())
    if transposed:
        layer = getattr(nn, f'ConvTranspose{dims}d')(cin, cout, k, stride=stride, dilation=dilation, groups=groups, bias=bias,
                                                    padding=draw(st.integers(0, (k-1)*dilation//2)),
                                                    output_padding=draw(st.integers(0, max(stride, dilation)-1)))
    else:
        mode = draw(st.sampled_from(['zeros', 'reflect', 'replicate', 'circular']))
        layer = getattr(nn, f'Conv{dims}d')(cin, cout, k, stride=stride, dilation=dilation, groups=groups, bias=bias,
                                           padding=draw(st.integers(0, 1)), padding_mode=mode)
    bn = getattr(nn, f'BatchNorm{dims}d')(cout, affine=affine, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])))
    size = 6 if dims < 3 else 5
    return nn.Sequential(layer, bn), torch.randn(2, cin, *[size]*dims)

@SETTINGS
@given(conv_bn(), st.integers(0, 2**16))
def test_conv_then_bn_folds_exactly(case, seed):
    model, x = case
    assert_folds_exactly(model, x, seed)

def linear_bn(nin, nout, bias, affine, bn_first, flat=False):
    layers = [nn.BatchNorm1d(nin, affine=affine), nn.Dropout(0.3), nn.Linear(nin, nout, bias=bias)] if bn_first else [
              nn.Linear(nin, nout, bias=bias), nn.BatchNorm1d(nout, affine=affine)]
    return nn.Sequential(*[nn.Flatten()]*flat, *layers)

@SETTINGS
@given(st.integers(1, 12), st.integers(1, 12), st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_linear_bn_in_either_order_folds_exactly(nin, nout, bias, affine, bn_first, flat, seed):
    "2-D input, shown by a `Flatten` before it or else by the sample"
    x = torch.randn(4, nin)
    assert_folds_exactly(linear_bn(nin, nout, bias, affine, bn_first, flat), x, seed, None if flat else x)

@SETTINGS
@given(st.integers(1, 8), st.integers(1, 8), st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_linear_bn_on_3d_input_is_left(c, nout, bias, affine, bn_first, sample, seed):
    "`(N, C, L)` with `L == C` (so the shapes agree): left, with or without the sample, and the outputs unchanged"
    model = randomize_bn(linear_bn(c, c if not bn_first else nout, bias, affine, bn_first), seed=seed).eval()
    x = torch.randn(3, c, c)
    folder = BN_Folder()
    folded = folder.fold(model, x if sample else None)
    assert folder.report.folded == [] and len(folder.report.left) == 1
    assert torch.equal(folded(x), model(x))

@st.composite
def bn_conv(draw):
    "A BN before a random conv: it must fold exactly when the conv pads no zeros, and be left when it does"
    dims,groups = draw(st.integers(1, 3)),draw(st.sampled_from([1, 2, 3]))
    cin,cout = groups*draw(st.integers(1, 3)),groups*draw(st.integers(1, 3))
    k,stride,dilation = draw(st.integers(1, 3)),draw(st.integers(1, 2)),draw(st.integers(1, 2))
    mode,padding = draw(st.sampled_from(['zeros', 'reflect', 'replicate', 'circular'])),draw(st.integers(0, 1))
    conv = getattr(nn, f'Conv{dims}d')(cin, cout, k, stride=stride, dilation=dilation, groups=groups, bias=draw(st.booleans()),
                                      padding=padding, padding_mode=mode)
    bn = getattr(nn, f'BatchNorm{dims}d')(cin, affine=draw(st.booleans()))
    return nn.Sequential(bn, conv), torch.randn(2, cin, *[6 if dims < 3 else 5]*dims), mode == 'zeros' and padding > 0

@SETTINGS
@given(bn_conv(), st.integers(0, 2**16))
def test_bn_before_conv_folds_exactly_unless_zero_padded(case, seed):
    model, x, zero_padded = case
    if not zero_padded: return assert_folds_exactly(model, x, seed)
    f = BN_Folder(); f.fold(randomize_bn(model, seed=seed).eval())
    assert not f.report.folded and 'pads with zeros' in f.report.left[0].reason

class _CatBN(nn.Module):
    def __init__(self, layers, bn): super().__init__(); self.layers,self.bn = nn.ModuleList(layers),bn
    def forward(self, x): return self.bn(torch.cat([l(x) for l in self.layers], 1))

@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(1, 2), st.booleans(), st.integers(0, 2**16))
def test_bn_after_cat_of_convs_folds_exactly(widths, dims, transposed, seed):
    kind = getattr(nn, f'ConvTranspose{dims}d' if transposed else f'Conv{dims}d')
    layers = [kind(3, w, 3, bias=i % 2 == 0) for i,w in enumerate(widths)]
    assert_folds_exactly(_CatBN(layers, getattr(nn, f'BatchNorm{dims}d')(sum(widths))), torch.randn(2, 3, *[6]*dims), seed)
