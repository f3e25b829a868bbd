"""A BN before Linears or convs, through reshapes, transposes, average pooling and other BNs (timm's NextViT), into
one layer or several, and each case that must be refused.

The hand-built models are folded *without* a sample, so the engine's own output check cannot hide a wrong fold: the
outputs are compared here with a float64 run of the original. A fold is right when the folded float32 model is about as
far from that run as the float32 original is (a wrong fold is off by the size of the outputs themselves).
"""
import copy
import pytest, torch, timm
import torch.nn.functional as F
from torch import nn
from fastfold.fold import BN_Folder, randomize_bn
from fastfold.layers import bn_layers

def fold_errors(model, *xs, seed=0, negate=()):
    "Fold `model` (random BN statistics; channels `negate` of every BN with a negative weight) without a sample: `(report, folded error, float32 error, largest output)`, errors vs float64"
    torch.manual_seed(seed)
    model = randomize_bn(model, seed).eval()
    with torch.no_grad():
        for _,bn in bn_layers(model): bn.weight[list(negate)] *= -1
    folder = BN_Folder()
    folded = folder.fold(model)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(*[x.double() for x in xs])
        e32 = (model(*xs).double() - ref).abs().max().item()
        ef = (folded(*xs).double() - ref).abs().max().item()
    return folder.report, ef, e32, ref.abs().max().item()

def check_folds(model, *xs, **kw):
    "Fold `model`: every BN must fold, and its outputs stay as close to float64 as the original's"
    rep,ef,e32,scale = fold_errors(model, *xs, **kw)
    assert not rep.left, rep
    assert ef <= max(10*e32, 1e-6*scale), (ef, e32, scale, rep)
    return rep

def left_reasons(model, *xs, **kw):
    "The reasons of the BNs `model` leaves (by name); the model's outputs must be unchanged"
    rep,ef,e32,scale = fold_errors(model, *xs, **kw)
    assert ef <= max(10*e32, 1e-6*scale), (ef, e32, rep) # first: a fold that should not have been made shows here
    return {l.bn: l.reason for l in rep.left}

class Attention(nn.Module):
    "NextViT's `norm1 -> e_mhsa` in small: the BN reaches `q` through a reshape and a transpose, `k` and `v` also through an `AvgPool1d` and a BN1d"
    def __init__(self, c=8, sr=True, extra=None):
        super().__init__()
        self.norm1,self.q,self.k,self.v = nn.BatchNorm2d(c),nn.Linear(c, c),nn.Linear(c, c),nn.Linear(c, c)
        self.sr,self.norm = (nn.AvgPool1d(4, 4),nn.BatchNorm1d(c)) if sr else (None,None)
        self.extra = extra
    def forward(self, x):
        B,C,H,W = x.shape
        out = x0 = self.norm1(x).reshape(B, C, -1).transpose(-1, -2)
        q = self.q(out)
        if self.sr is not None: out = self.norm(self.sr(out.transpose(1, 2))).transpose(1, 2)
        y = q.sum(1, keepdim=True) + self.k(out).sum(1, keepdim=True) * self.v(out).sum(1, keepdim=True)
        return y if self.extra is None else y + self.extra(x0).sum(1, keepdim=True)

x4 = lambda c=8, s=8: torch.randn(2, c, s, s)

@pytest.mark.parametrize('sr', [True, False])
def test_one_bn_into_several_linears(sr):
    rep = check_folds(Attention(sr=sr), x4())
    by = {p.bn: p for p in rep.folded}
    assert [l for l,_,_ in by['norm1'].parts] == ['q', 'k', 'v'] and by['norm1'].where == 'before'
    assert by['norm1'].vias == (((), ('norm',), ('norm',)) if sr else ((), (), ()))
    if sr: assert [l for l,_,_ in by['norm'].parts] == ['k', 'v'] and by['norm'].vias == ((), ())
    line = '  folded `norm1` into `q`, `k`, `v` (BN before Linear, through `reshape`, `transpose`' + (', `sr`; into `k` after `norm`; into `v` after `norm`)' if sr else ')')
    assert line in str(rep), rep

class TwoConvs(nn.Module):
    "One BN read directly by two convs, whose outputs are added"
    def __init__(self, pad=0): super().__init__(); self.bn,self.a,self.b = nn.BatchNorm2d(4),nn.Conv2d(4, 3, 1),nn.Conv2d(4, 3, 3, padding=pad)
    def forward(self, x): y = self.bn(x); return self.a(y).sum((2, 3)) + self.b(y).sum((2, 3))

def test_one_bn_into_several_convs_or_left_naming_the_one_that_cannot():
    rep = check_folds(TwoConvs(), x4(4, 9))
    assert [(p.bn, [l for l,_,_ in p.parts], p.into_conv) for p in rep.folded] == [('bn', ['a', 'b'], True)]
    assert left_reasons(TwoConvs(pad=1), x4(4, 9)) == {'bn': "`b` pads with zeros, where the BN's shift would be missing once folded"}

class Head(nn.Module):
    "A BN, then `pool` (global average pooling, flatten) and a Linear, as timm's `ClassifierHead` after NextViT's final `norm`"
    def __init__(self, pool, c=8): super().__init__(); self.bn,self.pool,self.fc = nn.BatchNorm2d(c),pool,nn.Linear(c, 5)
    def forward(self, x): return self.fc(self.pool(self.bn(x)))

class Fn(nn.Module):
    def __init__(self, f): super().__init__(); self.f = f
    def forward(self, x): return self.f(x)

@pytest.mark.parametrize('pool', [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), Fn(lambda x: x.mean((2, 3))),
                                  Fn(lambda x: x.mean((-1, -2), keepdim=True).flatten(1)), Fn(lambda x: F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)),
                                  Fn(lambda x: x.permute(0, 2, 3, 1).mean((1, 2))), Fn(lambda x: F.adaptive_max_pool2d(x, 1).flatten(1))],
                         ids=['AdaptiveAvgPool2d', 'mean', 'mean-keepdim', 'adaptive_avg_pool2d', 'permute-mean', 'adaptive_max_pool2d'])
def test_bn_through_global_pooling_into_linear(pool):
    rep = check_folds(Head(pool), x4())
    assert [(p.bn, p.layer, p.where) for p in rep.folded] == [('bn', 'fc', 'before')]

class Pooled(nn.Module):
    "A BN, then `pool`, then a conv that pads no zeros"
    def __init__(self, pool, c=4): super().__init__(); self.bn,self.pool,self.conv = nn.BatchNorm2d(c),pool,nn.Conv2d(c, 3, 3)
    def forward(self, x): return self.conv(self.pool(self.bn(x)))

@pytest.mark.parametrize('pool', [nn.AvgPool2d(2), nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), nn.AvgPool2d(2, ceil_mode=True), nn.MaxPool2d(3, 2, padding=1)],
                         ids=['avg', 'avg-pad-uncounted', 'avg-ceil', 'max-positive-scale'])
def test_bn_through_pooling_into_conv(pool):
    rep = check_folds(Pooled(pool), x4(4, 9))
    assert [(p.bn, p.layer, p.into_conv) for p in rep.folded] == [('bn', 'conv', True)]

# ---- refusals: each model would give wrong outputs if it folded ----
def test_refuses_max_pooling_with_a_negative_scale():
    assert left_reasons(Pooled(nn.MaxPool2d(3, 2, padding=1)), x4(4, 9), negate=[2]) == {
        'bn': '`pool` takes a maximum, which does not commute with the negative scale of 1 of its 4 channels'}
    assert left_reasons(Head(Fn(lambda x: F.adaptive_max_pool2d(x, 1).flatten(1))), x4(), negate=[0, 5]) == {
        'bn': '`adaptive_max_pool2d` takes a maximum, which does not commute with the negative scale of 2 of its 8 channels'}

def test_refuses_padded_average_pooling_that_counts_the_zeros():
    assert left_reasons(Pooled(nn.AvgPool2d(3, 2, padding=1)), x4(4, 9)) == {
        'bn': '`pool` pads with zeros and counts them (count_include_pad=True): its border windows would scale the shift'}
    assert left_reasons(Pooled(nn.AvgPool2d(2, divisor_override=3)), x4(4, 9)) == {
        'bn': '`pool` divides by 3, not by the number of values it sums, so the shift would change'}

class Mixes(nn.Module):
    "`reshape` from `(B, C, H, W)` to `(B, H*W, C)`, without a transpose: each row mixes channels and positions"
    def __init__(self, c=8): super().__init__(); self.bn,self.fc = nn.BatchNorm2d(c),nn.Linear(c, 5)
    def forward(self, x): return self.fc(self.bn(x).reshape(x.shape[0], -1, 8))

def test_refuses_a_reshape_that_mixes_channels_with_positions():
    assert left_reasons(Mixes(), x4()) == {'bn': '`reshape` may move values across its channels'}
    assert left_reasons(Head(Fn(lambda x: x.reshape(-1, 8, 16).transpose(1, 2))), x4()) == {'bn': '`reshape` may move values across its channels'} # 8 rows of 16, not (batch, C)
    assert left_reasons(Head(Fn(lambda x: x.mean(1).transpose(1, 2))), x4()) == {'bn': '`mean` averages over its channels'} # H takes the channels' place
    def merges(x): y = x.transpose(1, 2).flatten(1, 2); return y.reshape(y.shape[0], 8, -1).transpose(1, 2) # H and C merged, then cut in 8
    assert left_reasons(Head(Fn(merges)), x4()) == {'bn': '`flatten` merges its channels with other dims'}

def test_refuses_when_one_use_cannot_take_it_in():
    assert left_reasons(Attention(extra=nn.ReLU()), x4()) == {
        'norm1': 'its output reaches `extra` (ReLU) (through `reshape`, `transpose`), which cannot take in its map'}
    rep,*_ = fold_errors(Attention(extra=nn.ReLU()), x4())
    assert [(p.bn, p.layer) for p in rep.folded] == [('norm', 'k')] # the BN1d alone still folds into `k` and `v`

# ---- timm's NextViT: every BN folds, 8 of them through these rules ----
def test_nextvit_folds_every_bn_exactly():
    m = randomize_bn(timm.create_model('nextvit_small'), 0).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    folder = BN_Folder()
    folded = folder.fold(m, x)
    rep = folder.report
    assert (len(bn_layers(m)), rep.left, bn_layers(folded)) == (61, [], []), rep
    with torch.no_grad(): a,b = m(x),folded(x)
    assert (a-b).abs().max() <= 1e-5*a.abs().max(), ((a-b).abs().max(), a.abs().max())
    by = {p.bn: p for p in rep.folded}
    assert [l for l,_,_ in by['stages.1.blocks.3.norm1'].parts] == [f'stages.1.blocks.3.e_mhsa.{l}' for l in 'qkv']
    assert by['stages.1.blocks.3.norm1'].vias == ((), ('stages.1.blocks.3.e_mhsa.norm',), ('stages.1.blocks.3.e_mhsa.norm',))
    assert (by['norm'].layer, by['norm'].through) == ('head.fc', ('head.global_pool.pool', 'head.global_pool.flatten'))

def test_refuses_through_a_bn_that_is_left():
    m = Attention()
    m.norm.register_forward_hook(lambda mod, args, out: out*2) # its output is no longer its map: `norm` stays, so `norm1` cannot pass it
    assert left_reasons(m, x4()) == {'norm': 'it has hooks', 'norm1': 'it reaches `k` through `norm`, which is not folded into it'}
