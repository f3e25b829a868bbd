"""Conv and Linear subclasses with their own `forward`: those that only prepare their input fold, whatever the
padding; every kind that would make a wrong fold is refused with a reason.

Folds are made without a `sample`, so the engine's own output check cannot hide a wrong fold. Each refusal test
also folds with a deliberately permissive rule (no `forward` inspection) and shows that the result would be wrong:
the refusal is what keeps the model right."""
import copy
import pytest, torch, torch.nn.functional as F
from torch import nn
import fastfold.pairs
from fastfold.layers import bn_layers
from fastfold.fold import BN_Folder, randomize_bn

# ---- subclasses that only prepare their input
class ZeroPadChild(nn.Conv2d):
    "A `ZeroPad2d` child, as efficientnet_pytorch's static padding"
    def __init__(self, *a, **kw): super().__init__(*a, **kw); self.pad = nn.ZeroPad2d((1, 2, 0, 1))
    def forward(self, x): return F.conv2d(self.pad(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

class RuntimePad(nn.Conv2d):
    "`F.pad` by an amount computed from the input's size, as TensorFlow's 'same' padding"
    def forward(self, x):
        ih,iw = x.shape[-2:]
        ph,pw = [max((-(-i//s) - 1)*s + (k-1)*d + 1 - i, 0) for i,s,k,d in zip((ih, iw), self.stride, self.kernel_size, self.dilation)]
        if ph > 0 or pw > 0: x = F.pad(x, [pw//2, pw - pw//2, ph//2, ph - ph//2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

class ReflectThroughConvForward(nn.Conv2d):
    "Reflect padding, then `Conv2d._conv_forward`"
    def forward(self, x): return self._conv_forward(F.pad(x, (1, 1, 1, 1), mode='reflect'), self.weight, self.bias)

class SuperOnScaledInput(nn.Conv2d):
    "`Conv2d.forward` on a transformed input"
    def forward(self, x): return super().forward(torch.tanh(x) * 2)

class PlainLinear(nn.Linear):
    def forward(self, x): return F.linear(x, self.weight, self.bias)

class GroupedConvT(nn.ConvTranspose2d):
    def forward(self, x): return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation)

def fold_without_sample(model):
    model = randomize_bn(model).eval()
    folder = BN_Folder()
    return model, folder.fold(model), folder.report

def max_diff(a, b, x):
    with torch.inference_mode(): ya,yb = a(x),b(x)
    return (ya-yb).abs().max().item(), ya.abs().max().item()

def float64_close(model, folded, x):
    "The fold is as close to a float64 run of `model` as `model` itself is (within a factor 2)"
    with torch.inference_mode():
        y64 = copy.deepcopy(model).double()(x.double())
        e_orig,e_fold = (model(x).double()-y64).abs().max().item(),(folded(x).double()-y64).abs().max().item()
    return e_fold <= 2*e_orig + 1e-7*y64.abs().max().item()

IMG = torch.randn(2, 8, 13, 11)

@pytest.mark.parametrize('conv', [ZeroPadChild(8, 6, 3, stride=2), RuntimePad(8, 6, 3, stride=2, bias=False), RuntimePad(8, 6, 5, dilation=2),
                                  ReflectThroughConvForward(8, 6, 3), SuperOnScaledInput(8, 6, 3, groups=2, bias=False)],
                         ids=lambda c: f'{type(c).__name__}-bias{c.bias is not None}')
def test_padding_styles_fold(conv):
    m,folded,r = fold_without_sample(nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU()))
    assert (len(r.folded), r.left) == (1, []), r
    assert type(folded[0]) is type(conv) and type(folded[1]) is nn.Identity and folded[0].bias is not None
    assert float64_close(m, folded, IMG)

def test_linear_subclass_folds_after_and_before():
    x = torch.randn(16, 8)
    m = randomize_bn(nn.Sequential(PlainLinear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6), nn.Dropout(0.2), PlainLinear(6, 3, bias=False))).eval()
    folder = BN_Folder()
    folded,r = folder.fold(m, x),folder.report # a sample: only a run shows the BNs' inputs 2-D, their channels the Linears' features
    assert [(p.layer, p.bn, p.where) for p in r.folded] == [('0', '1', 'after'), ('5', '3', 'before')] and r.left == []
    assert float64_close(m, folded, x)

def test_grouped_conv_transpose_subclass_folds():
    m,folded,r = fold_without_sample(nn.Sequential(GroupedConvT(6, 9, 3, stride=2, groups=3), nn.BatchNorm2d(9)))
    assert len(r.folded) == 1 and float64_close(m, folded, torch.randn(2, 6, 5, 5))

# ---- every kind of refusal: left with a reason, and a permissive rule would have folded it wrong
class NormalisedWeight(nn.Conv2d):
    "A weight computed from the weight: each output channel's filter scaled to unit norm"
    def forward(self, x): return self._conv_forward(x, self.weight / self.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1), self.bias)

class GatedByItself(nn.Conv2d):
    "The weight used twice: the convolution gated by a sigmoid of itself"
    def forward(self, x): return F.conv2d(x, self.weight, self.bias) * torch.sigmoid(F.conv2d(x, self.weight))

class ClipsItsWeight(nn.Conv2d):
    "The weight used outside the convolution as well: clipped in place first, as some quantised nets do"
    def forward(self, x): self.weight.data.clamp_(-0.1, 0.1); return super().forward(x)

class BiasTwice(nn.Conv2d):
    def forward(self, x): return F.conv2d(x, self.weight, self.bias) + self.bias[:, None, None]

class BiasAddedAfter(nn.Conv2d):
    def forward(self, x): return F.conv2d(x, self.weight) + self.bias[:, None, None]

class IgnoresBias(nn.Conv2d):
    def forward(self, x): return F.conv2d(x, self.weight, None, self.stride, self.padding)

class PostProcessed(nn.Conv2d):
    def forward(self, x): return torch.tanh(super().forward(x))

class ActivatedInPlace(nn.Conv2d):
    "Post-processed in place: it returns the very tensor `conv2d` made, changed"
    def forward(self, x): return super().forward(x).relu_()

class ScalesItsInput(nn.Linear):
    def forward(self, x): return F.linear(x * torch.linspace(0.5, 2, x.shape[-1]), self.weight, self.bias)

from timm.layers import StdConv2d, ScaledStdConv2d
REFUSED = { # model, input, what the reason must say, and whether folding it anyway gives a wrong model here
    'std conv (timm)': (lambda: nn.Sequential(StdConv2d(8, 6, 3), nn.BatchNorm2d(6)), IMG, '`StdConv2d.forward` transforms its weight before use', True),
    'scaled std conv (timm)': (lambda: nn.Sequential(ScaledStdConv2d(8, 6, 3), nn.BatchNorm2d(6)), IMG, '`ScaledStdConv2d.forward` transforms its weight before use', True),
    'weight computed': (lambda: nn.Sequential(NormalisedWeight(8, 6, 3), nn.BatchNorm2d(6)), IMG,
                        '`NormalisedWeight.forward` transforms its weight before use (`flatten -> norm -> view -> div -> conv2d`)', True),
    'weight used twice': (lambda: nn.Sequential(GatedByItself(8, 6, 3), nn.BatchNorm2d(6)), IMG, '`GatedByItself.forward` calls `conv2d` 2 times with its weight', True),
    'weight also used elsewhere': (lambda: nn.Sequential(ClipsItsWeight(8, 6, 3), nn.BatchNorm2d(6)), IMG,
                                   '`ClipsItsWeight.forward` uses its weight outside `conv2d` too (`data`)', True),
    'bias used twice': (lambda: nn.Sequential(BiasTwice(8, 6, 3), nn.BatchNorm2d(6)), IMG, '`BiasTwice.forward` uses its bias outside `conv2d` (`getitem`)', True),
    # added right after the convolution, a bias is still a per-channel shift, so a fold would happen to be exact; fastfold
    # can't show that in general (the same use could sit behind anything) and refuses it
    'bias added after': (lambda: nn.Sequential(BiasAddedAfter(8, 6, 3), nn.BatchNorm2d(6)), IMG, '`BiasAddedAfter.forward` uses its bias outside `conv2d`', False),
    'bias ignored': (lambda: nn.Sequential(IgnoresBias(8, 6, 3, bias=False), nn.BatchNorm2d(6)), IMG, '`IgnoresBias.forward` does not pass its bias to `conv2d`', True),
    'output post-processed': (lambda: nn.Sequential(PostProcessed(8, 6, 3), nn.BatchNorm2d(6)), IMG, '`PostProcessed.forward` changes the result of `conv2d` before returning it (`tanh`)', True),
    'output post-processed in place': (lambda: nn.Sequential(ActivatedInPlace(8, 6, 3), nn.BatchNorm2d(6)), IMG,
                                       '`ActivatedInPlace.forward` passes the result of `conv2d` to `relu_` as well as returning it', True),
    'input scaled before a BN->Linear': (lambda: nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.BatchNorm1d(6), ScalesItsInput(6, 3)), torch.randn(16, 8),
                                         '`ScalesItsInput.forward` changes its input before `linear`', True),
}

@pytest.mark.parametrize('case', list(REFUSED))
def test_refused_with_reason_and_needed(case, monkeypatch):
    make,x,reason,wrong = REFUSED[case]
    torch.manual_seed(0)
    m,folded,r = fold_without_sample(make())
    assert r.folded == [] and len(r.left) == 1 and reason in r.left[0].reason, r
    assert max_diff(m, folded, x)[0] == 0 # nothing was changed
    # the rule is needed: with `forward` inspection switched off the same fold is silently wrong
    monkeypatch.setattr(fastfold.pairs, 'layer_problem', lambda layer, where='after': None)
    m,folded,r = fold_without_sample(make())
    diff,scale = max_diff(m, folded, x)
    assert len(r.folded) == 1
    assert (diff > 1e-3*scale) == wrong, f'{case}: a permissive fold differs by {diff:.3g} (largest output {scale:.3g})'

def test_forward_that_needs_values_is_refused():
    class DataDependent(nn.Conv2d):
        def forward(self, x): return super().forward(x) if self.weight.abs().sum() > 0 else x
    m,folded,r = fold_without_sample(nn.Sequential(DataDependent(8, 6, 3), nn.BatchNorm2d(6)))
    assert r.left[0].reason.startswith('`DataDependent.forward` could not be run on shape-only tensors (')

def test_forward_is_run_at_two_input_sizes():
    # 'same' padding depends on whether the input size is odd or even: a `forward` is seen at one size of each
    class OddSizesOnly(nn.Conv2d):
        def forward(self, x): return F.conv2d(x, self.weight * 2 if x.shape[-1] % 2 else self.weight, self.bias)
    m,folded,r = fold_without_sample(nn.Sequential(OddSizesOnly(8, 6, 3), nn.BatchNorm2d(6)))
    assert r.left[0].reason.startswith('`OddSizesOnly.forward` transforms its weight before use'), r

def test_inspection_leaves_the_layer_untouched():
    conv = RuntimePad(8, 6, 3, stride=2)
    model = randomize_bn(nn.Sequential(conv, nn.BatchNorm2d(6))).eval()
    sd = copy.deepcopy(model.state_dict())
    BN_Folder().fold(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k,v in sd.items()) and conv.weight.device.type == 'cpu'
    assert not (conv._forward_hooks or conv._forward_pre_hooks) and type(model[1]) is nn.BatchNorm2d
