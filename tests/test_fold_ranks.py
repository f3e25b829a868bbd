"""A BN next to a Linear folds only where its input is known to be 2-D. A BN normalises dim 1; a Linear works on the
last dim. `BatchNorm1d` also takes `(N, C, L)`, and where `L == C` the shapes agree while the dims do not: folding it
there is silently wrong. The same for a `BatchNorm1d` next to an unbatched `Conv1d`, whose channels are dim 0.

Each wrong case here is left with its reason, and each is shown to be needed: with `_rank_problem` switched off, the
same fold changes the outputs by about their own size. The right cases fold, from the graph alone (a `flatten`, a
`view` to listed sizes: fastai's head) or from a sample that shows the input 2-D.
"""
import copy
import pytest, torch
from torch import nn
from fastai.layers import Flatten as FastaiFlatten
from fastai.vision.learner import create_head
import fastfold.pairs
from fastfold.pairs import find_pairs, record_calls, InputRanks
from fastfold.fold import BN_Folder, randomize_bn
from fastfold.freeze import freeze_bn, fuse_frozen_bn

UNKNOWN = 'fastfold cannot tell that its input is 2-D'
SAMPLE_3D = "its input is 3-D on the sample: a BN normalises dim 1, a Linear's features are its last dim"

class CatLinear(nn.Module):
    "`lin(cat([bn(x), other(x2)], -1))`: the BN's output is the first columns of the Linear's input"
    def __init__(self, c=4):
        super().__init__(); self.bn,self.other,self.lin = nn.BatchNorm1d(c),nn.Linear(c, 8),nn.Linear(c+8, 3)
    def forward(self, x): return self.lin(torch.cat([self.bn(x), self.other(x)], -1))

class LinearsCat(nn.Module):
    "`bn(cat([a(x), b(x)], -1))`: the BN after two Linears' features"
    def __init__(self, c=6):
        super().__init__(); self.a,self.b,self.bn = nn.Linear(c, 2),nn.Linear(c, c-2),nn.BatchNorm1d(c)
    def forward(self, x): return self.bn(torch.cat([self.a(x), self.b(x)], -1))

class LeViTNorm(nn.Module):
    "timm's LeViT `LinearNorm`: `bn(linear(x).flatten(0, 1))`, 2-D only if `x` is 3-D"
    def __init__(self, c=5): super().__init__(); self.linear,self.bn = nn.Linear(c, c),nn.BatchNorm1d(c)
    def forward(self, x): y = self.linear(x); return self.bn(y.flatten(0, 1)).reshape_as(y)

C = 6 # every wrong case has L == C, so the shapes agree
WRONG = { # name: (model, an input that makes the fold wrong, what the BN folds into when the rule is off)
    'BN -> Linear': (lambda: nn.Sequential(nn.BatchNorm1d(C), nn.Linear(C, 3)), torch.randn(4, C, C)),
    'BN -> Dropout -> Linear': (lambda: nn.Sequential(nn.BatchNorm1d(C), nn.Dropout(0.3), nn.Linear(C, 3)), torch.randn(4, C, C)),
    'Linear -> BN': (lambda: nn.Sequential(nn.Linear(C, C), nn.BatchNorm1d(C)), torch.randn(4, C, C)),
    'Linear -> ReLU -> BN -> Linear': (lambda: nn.Sequential(nn.Linear(C, C), nn.ReLU(), nn.BatchNorm1d(C), nn.Linear(C, 2)), torch.randn(4, C, C)),
    'BN in a cat -> Linear': (lambda: CatLinear(4), torch.randn(3, 4, 4)),
    'cat of Linears -> BN': (lambda: LinearsCat(C), torch.randn(3, C, C)),
    'LeViT flatten(0, 1) of 4-D': (lambda: LeViTNorm(5), torch.randn(2, 3, 5, 5)),
    'unbatched Conv1d -> BN': (lambda: nn.Sequential(nn.Conv1d(C, C, 1), nn.BatchNorm1d(C)), torch.randn(C, C)),
}

def make(case, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(WRONG[case][0](), seed).eval()

def rel_diff(a, b): return ((a - b).abs().max() / b.abs().max()).item()

@pytest.mark.parametrize('case', list(WRONG))
def test_left_on_a_sample_that_shows_other_dims(case):
    m,x = make(case),WRONG[case][1]
    folder = BN_Folder()
    folded = folder.fold(m, x)
    r = folder.report
    assert r.folded == [] and len(r.left) == 1, r
    assert 'on the sample: a BN normalises dim 1' in r.left[0].reason, r
    assert torch.equal(folded(x), m(x))

@pytest.mark.parametrize('case', [c for c in WRONG if 'Conv1d' not in c])
def test_left_without_a_sample(case):
    "Nothing in these graphs says the input is 2-D: left, and the reason says a sample settles it"
    m,x = make(case),WRONG[case][1]
    folder = BN_Folder()
    folded = folder.fold(m)
    assert folder.report.folded == [] and folder.report.left[0].reason.startswith(UNKNOWN), folder.report
    assert 'fold with a sample' in folder.report.left[0].reason
    assert torch.equal(folded(x), m(x))

@pytest.mark.parametrize('case', list(WRONG))
def test_the_rule_is_needed(case, monkeypatch):
    "With the rule off the same BN folds, and the folded model is wrong by about the size of its outputs"
    m,x = make(case),WRONG[case][1]
    monkeypatch.setattr(fastfold.pairs, '_rank_problem', lambda *a: None)
    folder = BN_Folder()
    folded = folder.fold(m) # no sample: the output check would refuse it
    assert len(folder.report.folded) == 1, folder.report
    assert rel_diff(folded(x), m(x)) > 0.05

TWO_D = { # the same shapes with a 2-D input, where the fold is right
    'BN -> Linear': torch.randn(4, C), 'BN -> Dropout -> Linear': torch.randn(4, C), 'Linear -> BN': torch.randn(4, C),
    'Linear -> ReLU -> BN -> Linear': torch.randn(4, C), 'BN in a cat -> Linear': torch.randn(3, 4),
    'cat of Linears -> BN': torch.randn(3, C), 'LeViT flatten(0, 1) of 4-D': torch.randn(2, 3, 5), 'unbatched Conv1d -> BN': torch.randn(2, C, 7),
}

@pytest.mark.parametrize('case', list(TWO_D))
def test_folds_on_a_sample_that_shows_the_channels(case):
    m,x = make(case),TWO_D[case]
    folder = BN_Folder()
    folded = folder.fold(m, x)
    assert len(folder.report.folded) == len(folder.report.folded + folder.report.left) >= 1, folder.report
    assert rel_diff(folded(x), m(x)) < 1e-5

class ViewHead(nn.Module):
    def __init__(self, how):
        super().__init__(); self.how,self.bn,self.lin,self.bn2 = how,nn.BatchNorm1d(12),nn.Linear(12, 12),nn.BatchNorm1d(12)
    def forward(self, x):
        z = {'flatten1': lambda: x.flatten(1), 'torch.flatten': lambda: torch.flatten(x, 1), 'flatten0-2': lambda: x.unsqueeze(1).flatten(2).flatten(0, -2),
             'view size': lambda: x.view(x.size(0), -1), 'view shape': lambda: x.reshape(x.shape[0], 12), 'mean': lambda: x.mean((2, 3)).repeat(1, 4)}[self.how]()
        return self.bn2(self.lin(self.bn(z)))

@pytest.mark.parametrize('how', ['flatten1', 'torch.flatten', 'flatten0-2', 'view size', 'view shape'])
def test_graph_shows_2d_without_a_sample(how):
    "A `flatten` or a `view` to listed sizes makes the input 2-D whatever it was: both BNs fold with no sample, and exactly"
    torch.manual_seed(0)
    m = randomize_bn(ViewHead(how)).eval()
    x = torch.randn(4, 3, 2, 2)
    folder = BN_Folder()
    folded = folder.fold(m)
    assert [p.bn for p in folder.report.folded] == ['bn', 'bn2'] and folder.report.left == [], folder.report
    assert rel_diff(folded(x), m(x)) < 1e-5

def test_graph_that_does_not_show_2d():
    "`mean` then `repeat`: the rank is not read through them, so without a sample both are left; with one both fold"
    torch.manual_seed(0)
    m = randomize_bn(ViewHead('mean')).eval()
    pairs,left,_ = find_pairs(m)
    assert pairs == [] and all(l.reason.startswith(UNKNOWN) for l in left)
    assert len(find_pairs(m, sample=(torch.randn(4, 3, 2, 2),))[0]) == 2

@pytest.mark.parametrize('flatten', [nn.Flatten, FastaiFlatten])
def test_fastai_head_folds_without_a_sample(flatten):
    "fastai's `create_head` (`AdaptiveConcatPool2d -> Flatten -> BatchNorm1d -> Dropout -> Linear -> ReLU -> BatchNorm1d -> ...`)"
    torch.manual_seed(0)
    head = create_head(16, 5, lin_ftrs=[12])
    if flatten is nn.Flatten: head[1] = nn.Flatten()
    assert isinstance(head[1], flatten)
    head = randomize_bn(head).eval()
    folder = BN_Folder()
    folded = folder.fold(head)
    assert len(folder.report.folded) == 2 and folder.report.left == [], folder.report
    x = torch.randn(3, 16, 4, 4)
    assert rel_diff(folded(x), head(x)) < 1e-5

def test_record_calls_keeps_each_modules_input_ranks():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    out,ran = record_calls(m, (torch.randn(2, 4),))
    assert out.shape == (2, 4) and ran[id(m)] == {2} and ran[id(m[1])] == {2}

def test_sample_run_only_where_a_rank_is_needed():
    "The pair finder runs the sample only when the graph cannot say: never for a 2-D conv net"
    calls = []
    convnet = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    convnet.register_forward_pre_hook(lambda *a: calls.append(1))
    pairs,left,_ = find_pairs(convnet, sample=(torch.randn(2, 3, 8, 8),))
    assert len(pairs) == 2 and calls == []
    mlp = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    assert len(find_pairs(mlp, sample=(torch.randn(2, 4),))[0]) == 1 and calls == [1]
    ranks = InputRanks(mlp, sample=(torch.randn(2, 4),))
    assert ranks(mlp[1]) == {2} and ranks(mlp[1]) == {2} and calls == [1, 1] # one run, when first asked

def test_freezebn_does_not_fuse_where_the_fold_would_be_wrong(monkeypatch):
    "`FreezeBN(fuse=True)` reads the same rule: a Linear -> BatchNorm1d on `(N, C, L)` with `L == C` is not fused"
    m,x = make('Linear -> BN'),WRONG['Linear -> BN'][1]
    frozen = freeze_bn(m)
    try:
        ref = m(x)
        fusion = fuse_frozen_bn(m, frozen, (x,))
        assert fusion.fused == [] and SAMPLE_3D in fusion.report(), fusion.report()
        monkeypatch.setattr(fastfold.pairs, '_rank_problem', lambda *a: None)
        loose = fuse_frozen_bn(m, frozen, (x,))
        assert loose.fused == ['1'], loose.report()
        with loose: wrong = m(x)
        assert rel_diff(wrong, ref) > 0.05 # what the rule prevents
    finally: frozen.restore()

class PooledHead(nn.Module):
    "timm's RepViT head, reduced: a residual of BatchNorm2d outputs (4-D, since `BatchNorm2d` takes nothing else), `mean((2, 3))`, then `BN -> Linear`"
    def __init__(self, keepdim=False):
        super().__init__(); self.keepdim = keepdim
        self.conv,self.bn2d,self.conv2,self.bn2d2 = nn.Conv2d(3, 6, 1),nn.BatchNorm2d(6),nn.Conv2d(6, 6, 1),nn.BatchNorm2d(6)
        self.bn,self.lin = nn.BatchNorm1d(6),nn.Linear(6, 2)
    def forward(self, x):
        y = self.bn2d(self.conv(x))
        y = y + self.bn2d2(self.conv2(y)).relu()
        y = y.mean((2, 3), keepdim=self.keepdim)
        return self.lin(self.bn(y.flatten(1) if self.keepdim else y))

@pytest.mark.parametrize('keepdim', [False, True])
def test_rank_read_through_bn2d_residual_and_mean(keepdim):
    torch.manual_seed(0)
    m = randomize_bn(PooledHead(keepdim)).eval()
    folder = BN_Folder()
    folded = folder.fold(m) # no sample: the graph shows `bn`'s input 2-D
    assert {p.bn for p in folder.report.folded} == {'bn2d', 'bn2d2', 'bn'} and folder.report.left == [], folder.report
    x = torch.randn(2, 3, 5, 5)
    assert rel_diff(folded(x), m(x)) < 1e-5

class AddsADim(nn.BatchNorm1d):
    "Holds a BN's buffers, but its `forward` returns `(N, C, C)`: not shown to be a BN, so the rank after it is not known"
    def forward(self, x): return super().forward(x).unsqueeze(-1).expand(-1, -1, x.shape[1])

def test_rank_not_carried_through_a_module_not_shown_to_be_a_bn():
    torch.manual_seed(0)
    m = randomize_bn(nn.Sequential(nn.Flatten(), AddsADim(C), nn.BatchNorm1d(C), nn.Linear(C, 2))).eval()
    x = torch.randn(4, C)
    folder = BN_Folder()
    folded = folder.fold(m)
    reasons = {l.bn: l.reason for l in folder.report.left}
    assert folder.report.folded == [] and reasons['2'].startswith(UNKNOWN), folder.report
    assert torch.equal(folded(x), m(x))
