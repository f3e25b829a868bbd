"""Merging the parallel branches of a sum into one conv (`find_folds`, `BN_Folder`): hand-built blocks.

For each kind of refusal, a block whose branches must not merge and whose outputs would go wrong if the rule that
refuses it were loosened: the fold runs without a sample (so no output check can catch a wrong merge), and must keep
the block's outputs and say why. Blocks that line up merge exactly. Then property tests: random kernel sizes,
strides, paddings, dilations, groups and padding modes, merged exactly or left with a reason.

Every model gets random BN statistics (`randomize_bn`), so a wrong merge cannot hide behind identity statistics.
"""
import copy, pickle
import pytest, torch
import torch.nn.functional as F
from torch import nn
from hypothesis import given, settings, assume, strategies as st, HealthCheck
from timm.layers import BatchNormAct2d
from fastfold.layers import bn_layers, randomize_bn
from fastfold.fold import BN_Folder, float64_difference, output_difference

def x_of(*shape, seed=0): return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

def fold(model, x, seed=0):
    "Fold `model` (random BN statistics) without a sample; check it is untouched and the outputs are kept, in float32 and float64"
    model = randomize_bn(model, seed=seed).eval()
    sd = copy.deepcopy(model.state_dict())
    folder = BN_Folder()
    folded = folder.fold(model)
    r = folder.report
    assert all(torch.equal(v, model.state_dict()[k]) for k,v in sd.items())
    with torch.inference_mode(): d,s = output_difference(model(x), folded(x))
    assert d <= 1e-5*s + 1e-6, f'float32 outputs differ by {d:.3g} (largest {s:.3g})\n{r}'
    d,s,_ = float64_difference(model, r.folded, (x,), r.merged)
    assert d <= 1e-9*s, f'float64 outputs differ by {d:.3g} (largest {s:.3g})\n{r}'
    return folded, r

def n_convs(m): return sum(isinstance(c, nn.modules.conv._ConvNd) for c in m.modules())
def n_working_convs(m): return sum(isinstance(c, nn.modules.conv._ConvNd) and bool(c.weight.any()) for c in m.modules())

class Sum(nn.Module):
    "The sum of `branches` (modules, or `None` for the raw input) applied to one input"
    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList([b for b in branches if b is not None])
        self.raw = None in branches
    def forward(self, x):
        out = x if self.raw else 0
        for b in self.branches: out = out + b(x)
        return out

def cbn(*a, **kw): return nn.Sequential(nn.Conv2d(*a, **kw), nn.BatchNorm2d(a[1]))

## Blocks that merge

def test_repvgg_block_merges_to_one_conv():
    m = Sum(cbn(4, 4, 3, padding=1, bias=False), cbn(4, 4, 1, bias=False), nn.BatchNorm2d(4))
    folded,r = fold(m, x_of(2, 4, 7, 7))
    assert [(mg.into, [n for _,n in mg.branches]) for mg in r.merged] == [('branches.0.0', ['branches.0.0', 'branches.1.0', 'branches.2'])]
    assert (len(r.folded), r.n_bn, len(bn_layers(folded)), n_convs(folded)) == (3, 3, 0, 1)
    assert '  merged `branches.0.0`, `branches.1.0`, `branches.2` into `branches.0.0`' in str(r).splitlines()
    assert type(pickle.loads(pickle.dumps(folded))) is Sum

class RepVGG(nn.Module):
    "timm's RepVggBlock, reduced: the sum, then an activation module"
    def __init__(self, c=4):
        super().__init__()
        self.conv_kxk,self.conv_1x1,self.identity,self.act = cbn(c, c, 3, padding=1, bias=False),cbn(c, c, 1, bias=False),nn.BatchNorm2d(c),nn.ReLU()
    def forward(self, x):
        x = self.conv_1x1(x) + self.conv_kxk(x) + self.identity(x)
        return self.act(x)

def test_a_block_that_becomes_a_chain_is_replaced_by_sequential():
    "Once merged, the block only calls the merged conv then `act`: it becomes `nn.Sequential` of them, with no add left"
    model = nn.Sequential(RepVGG(), RepVGG())
    folded,r = fold(model, x_of(2, 4, 6, 6))
    assert [mg.block for mg in r.merged] == ['0', '1'] and r.merged[0].chain == ('0.conv_kxk.0', '0.conv_kxk.1', '0.act')
    assert [[type(c) for c in b] for b in folded] == [[nn.Conv2d, nn.ReLU]]*2
    assert type(folded) is nn.Sequential and type(model[0]) is RepVGG # the root class is kept, the input model untouched
    assert "  merged `0.conv_kxk.0`, `0.conv_1x1.0`, `0.identity` into `0.conv_kxk.0`; `0` is now `nn.Sequential` of what it calls" in str(r)
    assert torch.equal(pickle.loads(pickle.dumps(folded))(x_of(1, 4, 5, 5)), folded(x_of(1, 4, 5, 5)))

@pytest.mark.parametrize('total,forward', [('s + self.offset', 'self.act(s)'), ('s + x.flip(-1)', 'self.act(s)'), ('s', 'x + self.act(s)'), ('s', 'self.act(s).relu()'),
                                           ('s', 'self.act(s) * 2'), ('s', '(self.act(s), s)')])
def test_a_block_that_does_more_than_a_chain_keeps_its_forward(total, forward):
    "The sum also adds another tensor, or after it the block adds its input, calls a function, or returns the sum too: it stays, its emptied branches give zeros"
    class Block(RepVGG):
        def __init__(self): super().__init__(); self.register_buffer('offset', torch.randn(1, 4, 1, 1))
        def forward(self, x):
            s = self.conv_1x1(x) + self.conv_kxk(x) + self.identity(x)
            s = eval(total)
            return eval(forward)
    folded,r = fold(nn.Sequential(Block()), x_of(2, 4, 6, 6))
    assert len(r.merged) == 1 and r.merged[0].block == '' and type(folded[0]) is Block
    assert n_convs(folded) == 1

class RepViTDw(nn.Module):
    "timm's RepVggDw: a BN on the sum of a depthwise 3x3 conv + BN, a depthwise 1x1 conv and the input itself"
    def __init__(self, c=4, bn=None):
        super().__init__()
        self.conv,self.conv1,self.bn = cbn(c, c, 3, padding=1, groups=c, bias=False),nn.Conv2d(c, c, 1, groups=c),bn or nn.BatchNorm2d(c)
    def forward(self, x): return self.bn(self.conv(x) + self.conv1(x) + x)

def test_a_chain_merges_the_raw_input_and_folds_the_bn_on_the_sum():
    "Once the block is a chain, its sum's add goes: the input itself merges as a one-tap kernel, and the BN after the sum folds"
    folded,r = fold(nn.Sequential(RepViTDw(), RepViTDw()), x_of(2, 4, 6, 6))
    m = r.merged[0]
    assert (m.into, m.block, m.chain, m.identity, m.then_bn) == ('0.conv.0', '0', ('0.conv.0', '0.conv.1'), 1, '0.bn')
    assert (len(r.folded), r.n_bn, len(bn_layers(folded)), n_convs(folded)) == (4, 4, 0, 2)
    assert '  merged `0.conv.0`, `0.conv1`, the input into `0.conv.0`, then `0.bn`; `0` is now `nn.Sequential` of what it calls' in str(r)

def test_a_bn_on_the_sum_that_is_no_linear_map_stays():
    "A BN with an activation after the sum: the chain keeps it, the merged conv does not take it"
    folded,r = fold(nn.Sequential(RepViTDw(bn=BatchNormAct2d(4))), x_of(2, 4, 6, 6))
    assert (r.merged[0].block, r.merged[0].then_bn, len(bn_layers(folded))) == ('0', '', 1)

def test_the_raw_input_that_does_not_line_up_stays_a_term():
    "Stride-2 branches on a 2x2 input give 1x1, which the sum broadcasts against the 2x2 input: no chain, the input stays"
    class Broadcast(nn.Module):
        def __init__(self): super().__init__(); self.a,self.b = nn.Conv2d(4, 4, 3, 2, 1),nn.Conv2d(4, 4, 1, 2)
        def forward(self, x): return self.a(x) + self.b(x) + x
    folded,r = fold(nn.Sequential(Broadcast()), x_of(2, 4, 2, 2))
    assert (len(r.merged), r.merged[0].block, r.merged[0].identity) == (1, '', 0)

def test_a_chain_keeps_a_module_registered_elsewhere():
    "ultralytics' `Conv.default_act` is one module shared by every block; a block fx cannot trace is read from the sample run"
    class Untraceable(RepVGG):
        def forward(self, x):
            if x.shape[-1] > 0: x = self.conv_1x1(x) + self.conv_kxk(x) + self.identity(x)
            return self.act(x)
    model = nn.Sequential(Untraceable(), Untraceable())
    model[1].act = model[0].act = nn.Hardswish()
    model = randomize_bn(model).eval()
    x = x_of(2, 4, 6, 6)
    folder = BN_Folder()
    folded = folder.fold(model, sample=x) # fx cannot trace the blocks: read from the sample run
    assert [m.chain for m in folder.report.merged] == [('0.conv_kxk.0', '0.conv_kxk.1', '0.act'), ('1.conv_kxk.0', '1.conv_kxk.1', '0.act')]
    with torch.inference_mode(): d,s = output_difference(model(x), folded(x))
    assert d <= 1e-5*s
    assert folded[1][-1] is folded[0][-1] and len(bn_layers(folded)) == 0

def test_merges_where_the_block_adds_in_place_into_a_branch():
    "MobileOne's `out = conv_scale(x); out += conv(x)`: the emptied branch must give a new tensor, not its input"
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale,self.convs,self.identity = cbn(4, 4, 1),nn.ModuleList([cbn(4, 4, 3, padding=1) for _ in range(2)]),nn.BatchNorm2d(4)
        def forward(self, x):
            out = self.identity(x)
            out += self.scale(x)
            for c in self.convs: out += c(x)
            return out
    x = x_of(2, 4, 6, 6)
    for model in (InPlace(), nn.Sequential(InPlace())): # emptied branches; a chain
        folded,r = fold(model, x)
        assert len(r.merged) == 1 and n_convs(folded) == 1 and bool(r.merged[0].block) == (type(model) is nn.Sequential)
        x0 = x.clone(); folded(x); assert torch.equal(x, x0)

@pytest.mark.parametrize('branches', [
    [dict(kernel_size=3, padding=1, groups=4), dict(kernel_size=1, groups=4), 'bn'], # depthwise, with the identity
    [dict(kernel_size=(3, 5), padding=(1, 2)), dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))], # asymmetric kernels
    [dict(kernel_size=3, padding=1, stride=2), dict(kernel_size=1, stride=2)], # strided, no identity
    [dict(kernel_size=5, padding=4, dilation=2), dict(kernel_size=1)], # dilated
    [dict(kernel_size=3, padding=1, padding_mode='reflect'), dict(kernel_size=1), 'bn'], # a 1x1 conv and the identity read no padding
    [dict(kernel_size=5, padding=1), dict(kernel_size=3)], # the output shrinks: the emptied branch is a conv of zeros
])
def test_branches_that_line_up_merge(branches):
    ms = [nn.BatchNorm2d(4) if b == 'bn' else cbn(4, 4, **b) for b in branches]
    folded,r = fold(Sum(*ms), x_of(2, 4, 9, 9))
    assert len(r.merged) == 1 and not r.unmerged, r
    assert n_working_convs(folded) == 1 and not bn_layers(folded)

def test_a_raw_identity_stays_a_term():
    folded,r = fold(Sum(cbn(4, 4, 3, padding=1), cbn(4, 4, 1), None), x_of(2, 4, 5, 5))
    assert len(r.merged) == 1 and n_convs(folded) == 1

def test_a_sum_of_other_inputs_is_no_merge():
    "A ResNet block adds the input to a conv of something else: no group, nothing reported"
    class Res(nn.Module):
        def __init__(self): super().__init__(); self.a,self.b = cbn(4, 4, 3, padding=1),cbn(4, 4, 3, padding=1)
        def forward(self, x): return self.b(self.a(x).relu()) + x
    _,r = fold(Res(), x_of(2, 4, 5, 5))
    assert (r.merged, r.unmerged, len(r.folded)) == ([], [], 2)

## One block per refusal: each would give wrong outputs if its rule were loosened

class Reused(nn.Module):
    "The 1x1 branch's output is also returned: emptying it would change that output"
    def __init__(self): super().__init__(); self.a,self.b = cbn(4, 4, 3, padding=1),cbn(4, 4, 1)
    def forward(self, x):
        y = self.b(x)
        return self.a(x) + y, y

class SharedConv(nn.Module):
    "The 1x1 conv is also called on another tensor: emptying it would zero that call"
    def __init__(self): super().__init__(); self.a,self.b = nn.Conv2d(4, 4, 3, padding=1),nn.Conv2d(4, 4, 1)
    def forward(self, x): return self.a(x) + self.b(x), self.b(x.flip(-1))

class TwiceInSum(nn.Module):
    "One conv's output is two terms of the sum: merged once, it would count once"
    def __init__(self): super().__init__(); self.a,self.b = nn.Conv2d(4, 4, 3, padding=1),nn.Conv2d(4, 4, 1)
    def forward(self, x):
        y = self.b(x)
        return self.a(x) + y + y

class StdConv(nn.Conv2d):
    "A conv that standardises its weight in `forward`: its `weight` is not the kernel it applies"
    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)

class BNAct(nn.BatchNorm2d):
    "A BN that applies a ReLU after normalising: not a linear map"
    def forward(self, x): return super().forward(x).relu()

REFUSALS = {
    'output used elsewhere': (Reused(), 'the output of `b.1` also feeds `output`'),
    'shared conv': (SharedConv(), '`b` is called more than once'),
    'conv used twice in the sum': (TwiceInSum(), '`b` is 2 terms of the sum'),
    'layer subclass that prepares weights': (Sum(nn.Conv2d(4, 4, 3, padding=1), StdConv(4, 4, 1)), '`StdConv.forward`'),
    'BN alone that is no BN': (Sum(nn.Conv2d(4, 4, 3, padding=1), BNAct(4)), 'was not shown to compute a BN'),
    'BN alone with an activation': (Sum(nn.Conv2d(4, 4, 3, padding=1), BatchNormAct2d(4)), 'keeps Sequential after it'),
    'conv + BN with an activation': (Sum(nn.Conv2d(4, 4, 3, padding=1), nn.Sequential(nn.Conv2d(4, 4, 1), BatchNormAct2d(4))), 'keeps Sequential after it'),
    'off-centre kernels': (Sum(nn.Conv2d(4, 4, 3, stride=3), nn.Conv2d(4, 4, 1, stride=3)), "reads another input position"),
    'different stride': (Sum(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=3, padding=1)), 'has stride (3, 3)'),
    'different dilation': (Sum(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2)), 'has dilation (2, 2)'),
    'mixed padding modes': (Sum(nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'), nn.Conv2d(4, 4, 3, padding=1)), "pads with 'zeros'"),
    'groups that do not line up': (Sum(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, groups=4)), 'has 4 groups'),
    'centre between two taps': (Sum(nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 2, padding=1, dilation=2)), 'falls between two taps'),
}
SIZES = {'off-centre kernels': 6, 'different stride': 4} # where the two outputs have the same size

@pytest.mark.parametrize('kind', REFUSALS)
def test_refused_merge_keeps_outputs_and_says_why(kind):
    model,why = REFUSALS[kind]
    folded,r = fold(model, x_of(2, 4, SIZES.get(kind, 7), SIZES.get(kind, 7)))
    assert r.merged == [], r
    assert len(r.unmerged) == 1 and why in r.unmerged[0].reason, r
    assert f'  not merged ' in str(r)

def test_a_bn_alone_in_a_refused_sum_is_left_with_the_reason():
    m = Sum(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.BatchNorm2d(4))
    folded,r = fold(m, x_of(2, 4, 7, 7))
    assert [(l.bn, l.reason) for l in r.left] == [('branches.2', 'a branch of a sum that does not merge: `branches.1` has dilation (2, 2), `branches.0` (1, 1)')]
    assert len(bn_layers(folded)) == 1

## Property tests: random geometry, merged exactly or left with a reason

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

@st.composite
def branch_sums(draw):
    "Two or three conv branches (with or without BN) and maybe a BN on the identity, mostly lined up, sometimes not"
    groups = draw(st.sampled_from([1, 2, 4]))
    stride = draw(st.sampled_from([1, 1, 2]))
    k0,d0 = draw(st.sampled_from([1, 3, 5])),draw(st.sampled_from([1, 1, 2]))
    e0 = d0*(k0-1) - 2*draw(st.integers(0, d0*(k0-1)//2 + 1)) # the first branch's reach: how much smaller its output is
    mode = draw(st.sampled_from(['zeros', 'zeros', 'reflect']))
    convs = []
    for i in range(draw(st.integers(2, 3))):
        k,d = (k0, d0) if i == 0 else (draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 1, 2])))
        p = (d*(k-1) - e0)//2 if draw(st.integers(0, 4)) else draw(st.integers(0, 2)) # mostly centred
        if p < 0: p = 0
        g = groups if draw(st.integers(0, 5)) else draw(st.sampled_from([1, 2, 4]))
        s = stride if draw(st.integers(0, 5)) else draw(st.sampled_from([1, 2]))
        md = mode if draw(st.integers(0, 5)) else draw(st.sampled_from(['zeros', 'reflect']))
        conv = nn.Conv2d(4, 4, k, s, p, d, groups=g, bias=draw(st.booleans()), padding_mode=md)
        convs.append(nn.Sequential(conv, nn.BatchNorm2d(4)) if draw(st.booleans()) else conv)
    if stride == 1 and draw(st.booleans()): convs.append(nn.BatchNorm2d(4))
    return Sum(*convs), draw(st.integers(5, 9)), draw(st.integers(0, 2**16))

@SETTINGS
@given(branch_sums())
def test_random_branches_merge_exactly_or_say_why(case):
    model,size,seed = case
    x = x_of(2, 4, size, size, seed=seed)
    try:
        with torch.no_grad(): model.eval()(x)
    except RuntimeError: assume(False) # the branches' outputs do not add up (sizes), or reflect padding is too wide
    folded,r = fold(model, x, seed=seed)
    assert len(r.merged) + len(r.unmerged) == 1, r
    if r.merged: assert n_working_convs(folded) == 1 and not bn_layers(folded), r
    else: assert r.unmerged[0].reason and n_convs(folded) == n_convs(model), r

## Subtraction and constant per-channel factors (FastViT's RepMixer): the whole block becomes one conv

from timm.layers import LayerScale2d

def mixer(c=4): return Sum(cbn(c, c, 3, padding=1, groups=c, bias=False), cbn(c, c, 1, groups=c, bias=False), nn.BatchNorm2d(c))

def scale(m, seed=1):
    "Random layer scales: at timm's 1e-5 a wrong factor would hide below the tolerance"
    with torch.no_grad():
        for n,p in m.named_parameters():
            if n.endswith('gamma'): p.copy_(x_of(*p.shape, seed=seed))
    return m

class RepMixer(nn.Module):
    "timm's RepMixer, reduced: the input plus a layer scale of a mixer minus a BN of the input"
    def __init__(self, c=4, inplace=False):
        super().__init__()
        self.norm,self.mixer,self.layer_scale = nn.BatchNorm2d(c),mixer(c),LayerScale2d(c, inplace=inplace)
    def forward(self, x): return x + self.layer_scale(self.mixer(x) - self.norm(x))

class OwnScale(nn.Module):
    "The block's own code subtracts and multiplies by a Parameter of shape (C,1,1), a buffer and a number"
    def __init__(self, c=4, shape=None, **kw):
        super().__init__()
        self.a,self.b,self.gamma = cbn(c, c, 3, padding=1, **kw),nn.BatchNorm2d(c),nn.Parameter(torch.ones(shape or (c, 1, 1)))
        self.register_buffer('beta', torch.rand(1, c, 1, 1))
    def forward(self, x): return x - 0.5 * ((self.a(x) - self.b(x)) * self.gamma - self.beta * self.b2(x)) if hasattr(self, 'b2') else x + (self.a(x) - self.b(x)) * self.gamma

@pytest.mark.parametrize('inplace', [False, True])
def test_a_layer_scale_and_a_subtraction_merge_into_one_conv(inplace):
    model = scale(nn.Sequential(RepMixer(inplace=inplace), RepMixer(inplace=inplace)))
    folded,r = fold(model, x_of(2, 4, 6, 6))
    assert [(m.block, m.identity) for m in r.merged] == [('0', 1), ('1', 1)] and not r.unmerged, r
    assert (len(r.folded), r.n_bn, len(bn_layers(folded)), n_convs(folded)) == (8, 8, 0, 2)
    assert [[type(c) for c in b] for b in folded] == [[nn.Conv2d]]*2
    assert ('  merged `0.mixer.branches.0.0` times `0.layer_scale.gamma`, `0.mixer.branches.1.0` times `0.layer_scale.gamma`, '
            '`0.mixer.branches.2` times `0.layer_scale.gamma`, minus `0.norm` times `0.layer_scale.gamma`, the input into `0.mixer.branches.0.0`; '
            '`0` is now `nn.Sequential` of what it calls') in str(r).splitlines()

def test_factors_in_the_blocks_own_code_merge():
    "`x - 0.5*((a(x) - b(x))*gamma - beta*b2(x))`: numbers, a Parameter and a buffer, nested"
    class Nested(OwnScale):
        def __init__(self): super().__init__(); self.b2 = nn.BatchNorm2d(4)
    model = nn.Sequential(scale(Nested()), scale(OwnScale(), seed=2))
    folded,r = fold(model, x_of(2, 4, 6, 6))
    assert [m.coefs for m in r.merged] == [((-1., 0.5, '0.gamma'), (-1., 0.5, '0.gamma', -1.), (-1., 0.5, -1., '0.beta'), ()), (('1.gamma',), ('1.gamma', -1.), ())]
    assert (len(bn_layers(folded)), n_convs(folded)) == (0, 2)

def test_a_scale_computed_from_the_input_is_refused():
    "A gate computed in `forward` is no constant: the block keeps its outputs, and the report says why"
    class Gated(OwnScale):
        def forward(self, x): return x + (self.a(x) - self.b(x)) * x.mean((2, 3), keepdim=True)
    folded,r = fold(nn.Sequential(Gated()), x_of(2, 4, 6, 6))
    assert not r.merged and 'multiplies by a tensor computed in `forward`' in r.unmerged[0].reason, r
    assert len(bn_layers(folded)) == 1

def test_a_scale_that_is_not_per_channel_is_refused():
    "A Parameter of shape (1,1,1,4) scales the width, not the channels, although it holds 4 numbers for 4 channels"
    folded,r = fold(nn.Sequential(scale(OwnScale(shape=(1, 1, 1, 4)))), x_of(2, 4, 6, 4))
    assert not r.merged and r.unmerged[0].reason == 'it multiplies by `0.gamma` of shape (1, 1, 1, 4), not one factor per channel of 4', r

def test_a_difference_in_a_block_that_does_more_is_refused():
    "Subtractions and factors merge only where the whole block becomes one conv: here the block applies a ReLU to the difference"
    class More(OwnScale):
        def forward(self, x): return (x + self.a(x) - self.b(x)).relu()
    folded,r = fold(nn.Sequential(scale(More())), x_of(2, 4, 6, 6))
    assert not r.merged and 'merges only where the block that makes it becomes one conv, and `0` does more' in r.unmerged[0].reason, r

def test_fastvit_t8_folds_to_no_bn():
    "timm's FastViT: every RepMixer becomes one depthwise conv, as `reparameterize_model` makes it, and no BN is left"
    import timm
    from timm.utils.model import reparameterize_model
    torch.manual_seed(0)
    model = scale(randomize_bn(timm.create_model('fastvit_t8', pretrained=False)).eval())
    x = x_of(1, 3, 64, 64)
    folder = BN_Folder()
    folded = folder.fold(model, sample=x) # checks the outputs on `x`
    with torch.inference_mode(): d,s = output_difference(model(x), folded(x))
    assert d <= 1e-5*s, folder.report
    assert (len(bn_layers(folded)), folder.report.n_bn) == (0, 70)
    assert n_convs(folded) <= n_convs(reparameterize_model(model))
