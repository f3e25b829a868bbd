"""Folds through a concatenation or a reshape, and of a BN before a conv: fastai's TabularModel, timm's MixNets and
LeViT, hand-made cases of each rule, and each case that must be refused.

Every model is folded *without* a sample where it can be, so the engine's own output check cannot hide a wrong fold:
the outputs are compared here, against a float64 run of the original. A BN next to a Linear folds only where its input
is shown 2-D, by the graph or by a sample: those models are folded with their inputs as the sample (`sample=True`). A fold is right when the folded float32 model is about as far
from that float64 run as the float32 original is (a wrong fold is off by the size of the outputs themselves).
"""
import copy
import pytest, torch, timm
from torch import nn
from fastai.tabular.model import TabularModel
from timm.layers import MixedConv2d
from timm.layers.conv2d_same import Conv2dSame
from fastfold.layers import bn_layers
from fastfold.fold import BN_Folder, FoldedPair, randomize_bn

def _double(xs): return [x.double() if x.is_floating_point() else x for x in xs]

def fold_errors(model, *xs, seed=0, sample=False):
    "Fold `model` (random BN statistics) without a sample, or with `xs` if `sample`: `(report, folded error, float32 error, largest output)`, errors vs float64"
    torch.manual_seed(seed)
    model = randomize_bn(model, seed).eval()
    folder = BN_Folder()
    folded = folder.fold(model, xs if sample else None)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(*_double(xs))
        e32 = (model(*xs).double() - ref).abs().max().item()
        ef = (folded(*xs).double() - ref).abs().max().item()
    return folder.report, ef, e32, ref.abs().max().item()

def check_folds(model, *xs, n_left=0, sample=False):
    "Fold `model`; all its BN but `n_left` must fold, and its outputs stay as close to float64 as the original's"
    rep,ef,e32,scale = fold_errors(model, *xs, sample=sample)
    assert len(rep.left) == n_left, rep
    assert ef <= max(10*e32, 1e-6*scale), (ef, e32, scale, rep)
    return rep

def left_reason(model, *xs):
    "The one BN `model` leaves, and its reason; the model's outputs must be unchanged"
    rep,ef,e32,scale = fold_errors(model, *xs)
    assert ef <= max(10*e32, 1e-6*scale), (ef, e32, rep) # first: a fold that should not have been made shows here
    assert len(rep.left) == 1 and not rep.folded, rep
    return rep.left[0].reason

class Cat(nn.Module):
    "`post(bn(cat([layer(x) for layer in layers], dim)))`, or `bn(...)` on the cat of `parts(x)`"
    def __init__(self, layers, bn, dim=1, cat=torch.cat, post=None):
        super().__init__(); self.layers,self.bn,self.dim,self.cat,self.post = nn.ModuleList(layers),bn,dim,cat,post or nn.Identity()
    def forward(self, x): return self.post(self.bn(self.cat([l(x) for l in self.layers], self.dim)))

x4 = lambda c=3, s=9: torch.randn(2, c, s, s)

# ---- BN after a concatenation of layers ----
@pytest.mark.parametrize('cat,dim', [(torch.cat, 1), (torch.concat, -3), (torch.concatenate, 1)])
def test_bn_after_cat_of_convs(cat, dim):
    m = Cat([nn.Conv2d(3, 4, 3), nn.Conv2d(3, 2, 3, bias=False), nn.Conv2d(3, 6, 3, groups=3)], nn.BatchNorm2d(12), dim, cat)
    rep = check_folds(m, x4())
    assert rep.folded == [FoldedPair('layers.0', 'bn', 'after', (('layers.0', 0, 4), ('layers.1', 4, 6), ('layers.2', 6, 12)), ('cat',))]
    assert '  folded `bn` into `layers.0`, `layers.1`, `layers.2` (its channels 0-3, 4-5, 6-11)' in str(rep)

def test_bn_after_cat_of_conv_transposes_and_linears():
    check_folds(Cat([nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.ConvTranspose2d(4, 2, 3, stride=2)], nn.BatchNorm2d(8)), x4(4))
    check_folds(Cat([nn.Linear(5, 3), nn.Linear(5, 4)], nn.BatchNorm1d(7), dim=-1), torch.randn(6, 5), sample=True)

def test_mixed_conv_module_traced_through():
    "timm's MixedConv2d splits the channels, runs one conv per split and concatenates: its `forward` is the cat"
    m = nn.Sequential(MixedConv2d(8, 12, [3, 5], padding='', dilation=1, depthwise=False), nn.BatchNorm2d(12))
    rep = check_folds(m, x4(8, 11))
    assert [(p.bn, p.parts) for p in rep.folded] == [('1', (('0.0', 0, 6), ('0.1', 6, 12)))]

# ---- BN after a reshape that keeps each channel whole ----
class LinearNorm(nn.Module):
    "timm LeViT's `bn(linear(x).flatten(0, 1)).reshape_as(...)`, with the reshape in `how`"
    def __init__(self, how='flatten01', ni=5, nf=6):
        super().__init__(); self.linear,self.bn,self.how = nn.Linear(ni, nf, bias=False),nn.BatchNorm1d(nf),how
    def forward(self, x):
        y = self.linear(x)
        z = {'flatten01': lambda: y.flatten(0, 1), 'flatten0-2': lambda: torch.flatten(y, 0, -2),
             'view': lambda: y.contiguous().view(-1, 6), 'flatten12': lambda: y.flatten(1, 2),
             'transpose': lambda: y.transpose(1, 2), 'view12': lambda: y.view(-1, 12)}[self.how]()
        return self.bn(z).reshape_as(y) if self.how not in ('transpose', 'view12', 'flatten12') else self.bn(z)

@pytest.mark.parametrize('how', ['flatten01', 'flatten0-2', 'view'])
def test_bn_after_reshape_of_linear(how):
    rep = check_folds(LinearNorm(how), torch.randn(3, 4, 5), sample=how == 'flatten01') # `flatten(0, 1)` is 2-D only of a 3-D input
    assert rep.folded[0].where == 'after' and 'through `' in str(rep)

def test_bn_after_flatten_of_conv():
    "A BatchNorm1d over a conv's channels, its spatial dims flattened into one"
    class M(nn.Module):
        def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv2d(3, 4, 3),nn.BatchNorm1d(4)
        def forward(self, x): return self.bn(self.conv(x).flatten(2))
    rep = check_folds(M(), x4())
    assert '  folded `bn` into `conv` (after the layer, through `flatten`)' in str(rep)

# ---- BN before a Linear, through a concatenation ----
class Joined(nn.Module):
    "`lin(cat([emb(i), drop(bn(x)), other(x2)]))`, the BN at `pos`; `act` between the cat and the Linear"
    def __init__(self, pos=1, act=None, dim=1, twice=False):
        super().__init__()
        self.emb,self.bn,self.other,self.drop = nn.Embedding(10, 3),nn.BatchNorm1d(4),nn.Linear(2, 5),nn.Dropout(0.2)
        self.lin,self.pos,self.act,self.dim,self.twice = nn.Linear(12 + 4*twice, 3),pos,act,dim,twice
    def forward(self, i, x, x2):
        y = self.drop(self.bn(x))
        parts = [self.emb(i), self.other(x2)]
        parts.insert(self.pos, y)
        if self.twice: parts.append(y)
        y = torch.cat(parts, self.dim)
        return self.lin(y if self.act is None else self.act(y))

joined_in = lambda: (torch.randint(0, 10, (6,)), torch.randn(6, 4), torch.randn(6, 2))

@pytest.mark.parametrize('pos,cols', [(0, '0-3'), (1, '3-6'), (2, '8-11')])
def test_bn_before_linear_through_cat(pos, cols):
    rep = check_folds(Joined(pos), *joined_in(), sample=True)
    assert f'  folded `bn` into columns {cols} of `lin`' in str(rep)

# fastai's TabularModel: embeddings -> cat -> emb_drop, bn_cont(x_cont), cat of both -> LinBnDrop layers
TABULAR = {
    'default': dict(emb_szs=[(10, 4), (7, 3)], n_cont=5, out_sz=2, layers=[20, 10]),
    'dropouts': dict(emb_szs=[(10, 4), (7, 3), (3, 2)], n_cont=6, out_sz=3, layers=[16, 8, 8], ps=0.2, embed_p=0.1, bn_final=True, y_range=(0, 5)),
    'no_embeddings': dict(emb_szs=[], n_cont=5, out_sz=2, layers=[20, 10]),
    'one_cont': dict(emb_szs=[(10, 4)], n_cont=1, out_sz=1, layers=[8]),
    'lin_last': dict(emb_szs=[(10, 4), (7, 3)], n_cont=5, out_sz=2, layers=[20, 10], lin_first=False),
    'no_bn_cont': dict(emb_szs=[(10, 4)], n_cont=3, out_sz=2, layers=[8], bn_cont=False),
}

@pytest.mark.parametrize('name', list(TABULAR))
def test_tabular_model_folds_every_bn(name):
    kw = TABULAR[name]
    m = TabularModel(**kw)
    n = len(kw['emb_szs'])
    rep = check_folds(m, torch.stack([torch.randint(0, s[0], (8,)) for s in kw['emb_szs']], 1) if n else torch.zeros(8, 0, dtype=torch.long),
                      torch.randn(8, kw['n_cont']), sample=True)
    assert len(rep.folded) == len(bn_layers(m)), rep
    if name == 'default': assert '  folded `bn_cont` into columns 7-11 of `layers.0.0`' in str(rep)

def test_tabular_model_without_continuous():
    "With no continuous input, `bn_cont` (BatchNorm1d(0)) is never called: every BN that runs folds"
    m = TabularModel([(10, 4), (7, 3)], 0, 2, [20, 10])
    rep = check_folds(m, torch.randint(0, 7, (8, 2)), torch.zeros(8, 0), n_left=1, sample=True)
    assert [(l.bn, l.reason) for l in rep.left] == [('bn_cont', 'never called in `forward`')]

# ---- BN before a conv that pads no zeros ----
@pytest.mark.parametrize('conv', [nn.Conv2d(6, 4, 3), nn.Conv2d(6, 6, 3, groups=6, stride=2, bias=False),
                                  nn.Conv2d(6, 4, 3, padding=1, padding_mode='reflect'), nn.Conv2d(6, 8, 3, padding=2, groups=2, padding_mode='replicate'),
                                  nn.Conv2d(6, 4, 5, padding=2, padding_mode='circular', dilation=1), nn.Conv2d(6, 4, 1, padding='same')])
def test_bn_before_conv(conv):
    rep = check_folds(nn.Sequential(nn.BatchNorm2d(6), nn.Dropout2d(0.3), conv), x4(6))
    assert str(rep).endswith('  folded `0` into `2` (BN before the conv)')

def test_bn_before_conv1d_and_after_too():
    "An input BN on sensor channels, then conv -> BN: both fold into the conv"
    rep = check_folds(nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 8, 5, stride=2), nn.BatchNorm1d(8)), torch.randn(4, 3, 40))
    assert [(p.layer, p.where) for p in rep.folded] == [('1', 'before'), ('1', 'after')]

# ---- what must be refused, each with its reason ----
def test_refuses_cat_part_not_a_layer_output():
    class M(nn.Module):
        def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv2d(3, 3, 1),nn.BatchNorm2d(6)
        def forward(self, x): return self.bn(torch.cat([self.conv(x), x], 1))
    assert left_reason(M(), x4()) == "part 1 of its input `cat` is the input of the traced module, not a foldable layer's output"

def test_refuses_cat_part_used_twice():
    class Twice(nn.Module):
        def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv2d(3, 3, 1),nn.BatchNorm2d(6)
        def forward(self, x): y = self.conv(x); return self.bn(torch.cat([y, y], 1))
    assert left_reason(Twice(), x4()) == '`conv` is 2 parts of its input `cat`'
    class Reused(nn.Module):
        def __init__(self): super().__init__(); self.a,self.b,self.bn = nn.Conv2d(3, 3, 1),nn.Conv2d(3, 3, 1),nn.BatchNorm2d(6)
        def forward(self, x): y = self.a(x); return self.bn(torch.cat([y, self.b(x)], 1)) + y.mean()
    assert left_reason(Reused(), x4()) == 'the output of `a` also feeds `mean`'

def test_refuses_cat_along_other_dim():
    assert left_reason(Cat([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)], nn.BatchNorm2d(4), dim=2), x4()) == 'its input `cat` joins along dim 2, not the channels'
    assert left_reason(Cat([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)], nn.BatchNorm2d(4), dim=-1), x4()) == 'its input `cat` joins along dim -1, not the channels'

def test_refuses_bn_channels_not_the_cat():
    "A BN of 6 channels after a cat of 4 + 2 + 2 (the model cannot run: refused from the graph alone)"
    rep = BN_Folder(); rep.fold(Cat([nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)], nn.BatchNorm2d(6)))
    assert [l.reason for l in rep.report.left] == ['its input `cat` has 8 channels, the BN 6']

def test_refuses_activation_between_cat_and_linear():
    assert left_reason(Joined(act=nn.ReLU()), *joined_in()) == 'its `cat` feeds `act` (ReLU), not a Linear'

def test_refuses_bn_output_used_twice():
    assert left_reason(Joined(twice=True), *joined_in()) == 'its output is 2 parts of `cat`'
    class M(nn.Module):
        def __init__(self): super().__init__(); self.bn,self.conv = nn.BatchNorm2d(3),nn.Conv2d(3, 3, 1)
        def forward(self, x): y = self.bn(x); return self.conv(y) + y
    assert left_reason(M(), x4()) == 'its output feeds `conv` (Conv2d), `add`: it cannot be folded into `conv` (Conv2d) alone'

def test_refuses_cat_of_bn_along_other_dim():
    class M(nn.Module):
        def __init__(self): super().__init__(); self.bn,self.lin = nn.BatchNorm1d(4),nn.Linear(4, 2)
        def forward(self, x, y): return self.lin(torch.cat([self.bn(x), y], 0))
    assert left_reason(M(), torch.randn(3, 4), torch.randn(2, 4)) == 'it feeds `cat` along dim 0, not the features'

@pytest.mark.parametrize('conv', [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding='same'), Conv2dSame(3, 4, 3, stride=2)])
def test_refuses_bn_before_zero_padded_conv(conv):
    r = left_reason(nn.Sequential(nn.BatchNorm2d(3), conv), x4())
    assert r in ('`1` pads with zeros, where the BN\'s shift would be missing once folded',
                 '`Conv2dSame.forward` changes its input before `conv2d` (`pad -> conv2d`), so a BN before it cannot be folded into its weight'), r

def test_refuses_bn_before_conv_transpose():
    assert left_reason(nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3, stride=2)), x4()).startswith('it feeds `1`, a ConvTranspose')

@pytest.mark.parametrize('how,x', [('flatten12', torch.randn(3, 2, 5)), ('transpose', torch.randn(3, 6, 5)), ('view12', torch.randn(3, 2, 5))])
def test_refuses_reshape_mixing_the_channels(how, x):
    "Linear(5, 6) on (3, n, 5): `flatten(1, 2)` / `view(-1, 12)` merge its features with the tokens, `transpose` moves them"
    m = LinearNorm(how)
    if how != 'transpose': m.bn = nn.BatchNorm1d(12) # what the model needs to run; fastfold must also not fold it by counting
    rep,ef,e32,scale = fold_errors(m, x)
    assert rep.folded == [] and ef <= max(10*e32, 1e-6*scale)
    op = {'flatten12': 'flatten', 'view12': 'view', 'transpose': 'transpose'}[how]
    assert rep.left[0].reason in (f'`{op}` between `linear` and the BN may move values across its channels', '`linear` has 6 outputs, the BN 12'), rep

def test_refuses_flatten_merging_conv_channels():
    "conv1d output (N, C, L) with L == C: `flatten(0, 1)` puts channels into the batch, the BN normalises positions"
    class M(nn.Module):
        def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv1d(3, 4, 3),nn.BatchNorm1d(4)
        def forward(self, x): return self.bn(self.conv(x).flatten(0, 1))
    assert left_reason(M(), torch.randn(2, 3, 6)) == '`flatten` between `conv` and the BN may move values across its channels'

# ---- real models ----
@pytest.mark.parametrize('name,n_bn', [('mixnet_s', 49), ('tf_mixnet_s', 49), ('mixnet_xl', 70)])
def test_timm_mixnet_folds_every_bn(name, n_bn):
    m = timm.create_model(name, pretrained=False)
    rep = check_folds(m, x4(3, 64))
    assert len(rep.folded) == n_bn == len(bn_layers(m)), rep
    assert any(len(p.parts) > 1 for p in rep.folded)

def test_timm_levit_folds_every_bn():
    m = timm.create_model('levit_128', pretrained=False)
    rep = check_folds(m, x4(3, 224)[:1], sample=True)
    assert len(rep.folded) == 64 == len(bn_layers(m)), rep

def test_two_bns_in_one_cat():
    "Two BNs joined into one Linear: each folds into its own columns"
    class M(nn.Module):
        def __init__(self): super().__init__(); self.a,self.b,self.lin = nn.BatchNorm1d(3),nn.BatchNorm1d(2),nn.Linear(5, 4)
        def forward(self, x, y): return self.lin(torch.cat([self.a(x), self.b(y)], -1))
    rep = check_folds(M(), torch.randn(6, 3), torch.randn(6, 2), sample=True)
    assert str(rep).splitlines()[2:] == ['  folded `a` into columns 0-2 of `lin`', '  folded `b` into columns 3-4 of `lin`']

def test_refuses_through_a_bn_that_is_left():
    "TabularModel(lin_first=False): `bn_cont` reaches the Linear through `layers.0.0`; if that BN stays, so does `bn_cont`"
    m = TabularModel([(10, 4)], 3, 2, [8], lin_first=False)
    m.layers[0][0].register_forward_hook(lambda *a: None)
    rep,ef,e32,scale = fold_errors(m, torch.randint(0, 10, (8, 1)), torch.randn(8, 3), sample=True)
    assert ef <= max(10*e32, 1e-6*scale)
    assert {l.bn: l.reason for l in rep.left} == {'layers.0.0': 'it has hooks', 'bn_cont': 'it reaches `layers.0.1` through `layers.0.0`, which is left'}
