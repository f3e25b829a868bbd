"""Pairs from what really runs (`fastfold.pairs`): a `forward` fx traces alone is trusted only where the model is shown
to call it, and what fx cannot trace is read from a run on the sample.

Each block below is one pattern: a parent fx cannot trace that iterates, indexes or calls the items of a container
with an `add` in between (a pair read from the container's own `forward` would be wrong), and the modules fx stops at
(a shape-dependent branch, a module built inside `forward`, an optional argument left `None`). Each is folded with and
without a sample, and the folded model is compared with the original on inputs other than the sample."""
import copy, warnings
import pytest, torch
import torch.nn.functional as F
from torch import nn
import fastfold.pairs
from fastfold.layers import bn_layers
from fastfold.fold import BN_Folder, randomize_bn
from fastfold.pairs import run_graph

@pytest.fixture(autouse=True)
def seed(): torch.manual_seed(0)

def rel_diff(a, b) -> float:
    "Worst |a-b| over the tensors of two outputs, relative to the largest |a|"
    ta = a if isinstance(a, (tuple, list)) else list(a.values()) if isinstance(a, dict) else [a]
    tb = b if isinstance(b, (tuple, list)) else list(b.values()) if isinstance(b, dict) else [b]
    return max(((x.double()-y.double()).abs().max()/x.double().abs().max()).item() for x,y in zip(ta, tb))

def fold(model, sample=None, inputs=()):
    "Fold `model` (random BN statistics, eval), check the folded model on `inputs` (tuples of positional inputs); the report"
    m = randomize_bn(model).eval()
    folder = BN_Folder()
    folded = folder.fold(m, sample=sample)
    with torch.no_grad():
        for xs in inputs: assert rel_diff(m(*xs), folded(*xs)) < 1e-5, folder.report
    return folder.report

def reasons(r): return {l.bn: l.reason for l in r.left}

class Add(nn.Module):
    "`conv -> add -> BN` inside one container's items: `seq = [Sequential(conv, BN)...]`, the parent adds a shortcut between items"
    def __init__(self, c=4): super().__init__(); self.seq = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))

class Iterates(Add):
    "MONAI's `_ResidualBlock`: a shape test fx cannot trace, then the container's items called in a loop with the shortcut added after each"
    def forward(self, x):
        sc = x[:, :, :-1] if x.shape[-2] % 2 else x
        for layer in self.seq: x = layer(x) + sc
        return x

class Indexes(Add):
    def forward(self, x):
        if x.shape[-1] > 1: x = self.seq[0](x) + x
        return self.seq[3](self.seq[2](self.seq[1](x)) + x)

class CallsByName(nn.Module):
    "Calls the items of a named container one by one"
    def __init__(self, c=4): super().__init__(); self.block = nn.Sequential(); self.block.add_module('conv', nn.Conv2d(c, c, 1)); self.block.add_module('bn', nn.BatchNorm2d(c))
    def forward(self, x):
        y = self.block.conv(x)
        if y.shape[1] == x.shape[1]: y = y + x
        return self.block.bn(y)

class KeepsItems(Add):
    "Keeps the container's items in a list while built, and calls them from there"
    def __init__(self): super().__init__(); self.items = list(self.seq)
    def forward(self, x):
        for layer in self.items: x = layer(x) + (x if x.shape[-1] > 1 else 0)
        return x

def inputs(*shape, n=3): return [(torch.randn(*shape)*3-1,) for _ in range(n)]

@pytest.mark.parametrize('block', [Iterates, Indexes, CallsByName, KeepsItems])
def test_untraceable_parent_without_sample_pairs_nothing_its_children_may_not_run(block):
    r = fold(block(), inputs=inputs(2, 4, 6, 6))
    assert r.folded == []
    assert all('fold with a sample to settle it' in why for why in reasons(r).values()), r
    assert any("in the `forward` of `seq`" in why or "in the `forward` of `block`" in why for why in reasons(r).values())

WHAT_RAN = {Iterates: [], # the shortcut is added after each item: between every conv and the BN after it
            Indexes: [('seq.2', 'seq.1', 'before')], # `seq[1] -> seq[2]` is a BN before a conv that pads no zeros
            CallsByName: [], KeepsItems: []}

@pytest.mark.parametrize('block', [Iterates, Indexes, CallsByName, KeepsItems])
def test_untraceable_parent_with_sample_pairs_what_ran(block):
    x = torch.randn(2, 4, 6, 6)
    r = fold(block(), sample=x, inputs=inputs(2, 4, 6, 6))
    assert [(p.layer, p.bn, p.where) for p in r.folded] == WHAT_RAN[block]
    assert all(why.startswith('its input comes from `add`') for why in reasons(r).values()), r

class Items(nn.Module):
    "Items that each hold a pair, called one by one with an add between them: the pairs inside each item are exact"
    def __init__(self, c=4): super().__init__(); self.items = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()) for _ in range(3)])
    def forward(self, x):
        for item in self.items: x = item(x) + (x if x.shape[-1] > 1 else 0)
        return x

def test_items_called_one_by_one_fold_inside_each():
    # without a sample the parent's code shows each item is called whole (`for item in self.items: item(x)`)
    r = fold(Items(), inputs=inputs(2, 4, 5, 5))
    assert [(p.layer, p.bn) for p in r.folded] == [(f'items.{i}.0', f'items.{i}.1') for i in range(3)] and r.left == []
    r = fold(Items(), sample=torch.randn(2, 4, 5, 5), inputs=inputs(2, 4, 5, 5))
    assert [(p.layer, p.bn) for p in r.folded] == [(f'items.{i}.0', f'items.{i}.1') for i in range(3)]
    assert all(p.traced_at == '' for p in r.folded) # fx already showed them

class Sometimes(Add):
    "Chooses by value: one run shows one of two paths"
    def forward(self, x): return self.seq(x) if x.mean() > 0 else self.seq[1](self.seq[0](x) + x)

def test_a_run_that_reads_values_does_not_pair():
    x = torch.randn(2, 4, 6, 6).abs()
    r = fold(Sometimes(), sample=x, inputs=[(x,), (-x,)])
    assert r.folded == []
    assert "reads tensor values (`bool` in `model`)" in reasons(r)['seq.1'], r

# ---- what fx cannot trace, read from a run on the sample
class ShapeBranch(nn.Module):
    "TF 'same' padding: how much depends on the input's size"
    def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv2d(3, 4, 3, stride=2),nn.BatchNorm2d(4)
    def forward(self, x):
        if x.shape[-1] % 2: x = F.pad(x, (1, 1, 1, 1))
        else: x = F.pad(x, (0, 1, 0, 1))
        return self.bn(self.conv(x))

class BuiltInForward(nn.Module):
    "tsai's `SameConv1d`: a padding module built inside `forward`"
    def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv1d(3, 4, 3),nn.BatchNorm1d(4)
    def forward(self, x): return self.bn(self.conv(nn.ConstantPad1d((1, 1), 0.)(x)))

class OptionalNone(nn.Module):
    "An optional mask that is `None` on the sample: fx would make it a proxy, and `mask.dtype` then hits control flow"
    def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv2d(3, 4, 1),nn.BatchNorm2d(4)
    def forward(self, x, mask=None):
        y = self.conv(x)
        if mask is not None:
            if mask.dtype == torch.bool: mask = mask.float()
            y = y * mask
        return self.bn(y)

@pytest.mark.parametrize('block,shape', [(ShapeBranch, (2, 3, 7, 7)), (BuiltInForward, (2, 3, 9))])
def test_untraceable_module_folds_from_the_sample_run(block, shape):
    r = fold(nn.Sequential(block()), inputs=inputs(*shape))
    assert r.folded == [] and len(r.left) == 1 and r.untraceable[0][0] == '0'
    assert reasons(r)['0.bn'] == 'inside untraceable `0`, not reached by tracing'
    r = fold(nn.Sequential(block()), sample=torch.randn(*shape), inputs=inputs(*shape))
    assert [(p.layer, p.bn, p.traced_at) for p in r.folded] == [('0.conv', '0.bn', 'x'.join(map(str, (2, 3, 9, 9)[:len(shape)] if block is ShapeBranch else (2, 3, 11))))]
    assert f'[read from the sample run, where `0.conv` took {r.folded[0].traced_at}]' in str(r)

def test_optional_argument_left_none_is_traced_as_none():
    x = torch.randn(2, 3, 5, 5)
    r = fold(OptionalNone(), inputs=inputs(2, 3, 5, 5))
    assert r.folded == [] and r.untraceable == [('', 'TraceError: symbolically traced variables cannot be used as inputs to control flow')]
    r = fold(OptionalNone(), sample=x, inputs=inputs(2, 3, 5, 5))
    assert [(p.layer, p.bn, p.traced_at) for p in r.folded] == [('conv', 'bn', '')] and r.untraceable == [] # fx traced it, for any shape
    mask = torch.rand(2, 1, 5, 5) > 0.5 # given, the mask is multiplied in between: nothing to fold
    r = fold(OptionalNone(), sample=(x, mask), inputs=[(x, mask), (-x, ~mask)])
    assert r.folded == [] and reasons(r) == {'bn': 'its input comes from `mul`, not a foldable layer'}

def test_optional_argument_left_out_by_the_call_around_it_is_traced_as_none():
    r = fold(nn.Sequential(OptionalNone()), inputs=inputs(2, 3, 5, 5)) # `Sequential` calls it with `x` alone: no sample needed
    assert [(p.layer, p.bn, p.traced_at) for p in r.folded] == [('0.conv', '0.bn', '')] and r.untraceable == [], r

class ShiftUnlessMasked(nn.Module):
    def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv2d(3, 4, 1),nn.BatchNorm2d(4)
    def forward(self, x, mask=None):
        y = self.conv(x)
        if mask is None: y = y + 1 # with `mask` a proxy, fx would skip this
        return self.bn(y)

class CallsWithoutMask(nn.Module):
    def __init__(self): super().__init__(); self.block = ShiftUnlessMasked()
    def forward(self, x): return self.block(x) if x.shape[-1] > 1 else x

def test_child_traced_alone_gets_none_for_what_its_parent_leaves_out():
    r = fold(CallsWithoutMask(), inputs=inputs(2, 3, 5, 5))
    assert r.folded == [] and reasons(r) == {'block.bn': 'its input comes from `add`, not a foldable layer'}, r

class InPlace(nn.Module):
    "Writes into the conv's output in place, directly or through a view, after a shape test fx cannot trace"
    def __init__(self, view): super().__init__(); self.view,self.conv,self.bn = view,nn.Conv2d(3, 3, 1),nn.BatchNorm2d(3)
    def forward(self, x):
        y = self.conv(x)
        if x.shape[-1] > 1:
            if self.view: y.flatten(2)[..., 0].add_(1.)
            else: y += x
        return self.bn(y)

@pytest.mark.parametrize('view', [False, True])
def test_in_place_writes_are_seen(view):
    x = torch.randn(2, 3, 4, 4)
    r = fold(InPlace(view), sample=x, inputs=inputs(2, 3, 4, 4))
    assert r.folded == []
    assert reasons(r)['bn'].startswith('its input comes from `add_`'), r

def test_run_graph_names_modules_by_full_path():
    m = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)), nn.ReLU())
    run = run_graph(m.eval(), (torch.randn(1, 3, 4, 4),))
    assert [(n.target, n.meta['shape']) for n in run.graph.nodes if n.op == 'call_module'] == [('0.0', '1x3x4x4'), ('0.1', '1x3x4x4'), ('1', '1x3x4x4')]
    assert run.value_reads == []

def test_reasons_name_modules_by_full_path():
    class Untraceable(nn.Module):
        def __init__(self): super().__init__(); self.body = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3))
        def forward(self, x): return self.body(x) if x.sum() > 0 else x
    r = fold(nn.Sequential(nn.Identity(), Untraceable()))
    assert reasons(r) == {'1.body.2': 'its input comes from `1.body.1` (ReLU), not a foldable layer'}

def test_a_parent_whose_code_just_calls_its_child_shows_it_runs():
    tv = pytest.importorskip('torchvision')
    from fastfold.pairs import traced_graphs
    m = tv.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=3)
    graphs,untraceable = traced_graphs(m.eval())
    assert untraceable[0][0] == '' # torchvision's detectors: fx cannot trace their `forward`
    assert {g.prefix: g.shown for g in graphs}['backbone'] # which only calls `self.backbone(...)`

# ---- the rule is needed: paired in any child's own `forward`, the blocks above fold wrong
@pytest.mark.parametrize('block', [Iterates, Indexes, CallsByName, KeepsItems])
def test_pairing_in_any_child_forward_would_be_wrong(block, monkeypatch):
    monkeypatch.setattr(fastfold.pairs, '_not_shown', lambda v, g, untraceable: v)
    m = randomize_bn(block()).eval()
    folder = BN_Folder()
    folded = folder.fold(m)
    assert folder.report.folded
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad(): assert rel_diff(m(x), folded(x)) > 1e-2

# ---- the real models
def test_monai_hovernet_fast():
    pytest.importorskip('monai')
    from monai.networks.nets import HoVerNet
    m = randomize_bn(HoVerNet(mode='fast', out_classes=2)).eval()
    x = torch.randn(1, 3, 256, 256) # the only size HoVerNet's fast mode takes; each run takes seconds, so few are made
    with torch.no_grad(): y = m(x)
    folder = BN_Folder()
    folded = folder.fold(m)
    r = folder.report
    with torch.no_grad(): assert rel_diff(y, folded(x)) < 1e-5, r
    assert len(r.folded) == 69 and r.n_bn == len(bn_layers(m)) == 130, r
    # `_ResidualBlock.forward` loops over `layers`, calls each item (`layer.forward(x)`) and adds the shortcut after it:
    # the pairs inside each item fold, none across items
    assert len([p for p in r.folded if '.layers.denselayer_' in p.bn]) == 32, r
    assert all(p.layer.rpartition('.')[0] == p.bn.rpartition('.')[0] for p in r.folded), r # layer and BN in one item
    assert reasons(r)['res_blocks.d0.layers.denselayer_1.layers.preact/bn'] == 'its input comes from the input of `res_blocks.d0.layers.denselayer_1`, not a foldable layer'
    folder.fold(m, sample=x) # its check compares the outputs on `x`
    r = folder.report
    assert len(r.folded) == 72 and r.max_abs_diff < 1e-5*max(t.abs().max().item() for t in y.values()), r
    assert reasons(r)['res_blocks.d0.layers.denselayer_1.layers.preact/bn'] == 'its input comes from the input of `res_blocks.d0.layers.denselayer_1`, not a foldable layer'

def _hf_model(name):
    transformers = pytest.importorskip('transformers')
    cfg = getattr(transformers, f'{name}Config')(depth_multiplier=0.35, image_size=64, num_labels=3)
    return getattr(transformers, f'{name}ForImageClassification')(cfg)

@pytest.mark.parametrize('name', ['MobileNetV1', 'MobileNetV2'])
def test_hugging_face_mobilenets_fold_every_bn_given_a_sample(name):
    m = _hf_model(name)
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        r = fold(m, sample=x, inputs=[(x,), (torch.randn(2, 3, 64, 64),)])
    assert r.left == [] and len(r.folded) == len(bn_layers(m)), r

def test_tsai_xcm_folds_every_bn_given_a_sample():
    pytest.importorskip('tsai')
    from tsai.models.XCM import XCM
    m = XCM(3, 2, 16, nf=8)
    x = torch.randn(4, 3, 16)
    r = fold(m, sample=x, inputs=[(x,), (torch.randn(4, 3, 16),)])
    assert r.left == [] and len(r.folded) == len(bn_layers(m)) == 3, r
    assert [p.layer for p in r.folded] == ['conv2dblock.1.conv2d_same', 'conv1dblock.0.conv1d_same', 'conv1d.0.conv1d_same']

# ---- the items of a container, reached one by one from an untraceable parent, without a sample
class ConvBN(nn.Module):
    def __init__(self, c=4): super().__init__(); self.conv,self.bn = nn.Conv2d(c, c, 3, padding=1),nn.BatchNorm2d(c)
    def forward(self, x): return self.bn(self.conv(x))
    def setup(self): self.ready = True

class LoopsItems(nn.Module):
    "Calls each item of a ModuleList in a loop, with a residual add between: item 0 ends in a conv, item 1 starts with a BN"
    def __init__(self, c=4):
        super().__init__()
        self.items = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 1)),
                                    nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))])
        m = self.items[-1] # while built, an item may be set up: an attribute set, a method called
        m.stride = 1
    def forward(self, x):
        if x.shape[-1] < 2: return x
        for i,item in enumerate(self.items): x = item(x) + x
        return x

class IndexesItem(nn.Module):
    def __init__(self, c=4): super().__init__(); self.items = nn.ModuleList([ConvBN(c), ConvBN(c)]); self.items[0].setup()
    def forward(self, x):
        if x.shape[-1] > 1: x = self.items[0](x) + x
        return self.items[1].forward(x) * (2 if self.items[1].training else 1)

class CallsPartOfItem(nn.Module):
    "Calls a submodule of an item, and something else before the item's BN"
    def __init__(self, c=4): super().__init__(); self.items = nn.ModuleList([ConvBN(c)])
    def forward(self, x):
        y = self.items[0].conv(x)
        if y.shape[1] == x.shape[1]: y = y + x
        return self.items[0].bn(y)

def run_item(item, x): return item.bn(item.conv(x) + x)

class PassesItem(nn.Module):
    "Passes each item to a function, which calls the item's parts with an add between"
    def __init__(self, c=4): super().__init__(); self.items = nn.ModuleList([ConvBN(c), ConvBN(c)])
    def forward(self, x):
        for item in self.items: x = run_item(item, x) if x.shape[-1] > 1 else item(x)
        return x

class Nested(nn.Module):
    "Loops over stages and over each stage's blocks, with an add after each block"
    def __init__(self, c=4): super().__init__(); self.stages = nn.ModuleList([nn.ModuleList([ConvBN(c), ConvBN(c)]) for _ in range(2)])
    def forward(self, x):
        for stage in self.stages:
            for block in stage: x = block(x) + (x if x.shape[-1] > 1 else 0)
        return x

ITEM_PAIRS = {LoopsItems: [('items.0.0', 'items.0.1'), ('items.1.2', 'items.1.3')], # never `items.0.2 -> items.1.0`, across the add
              IndexesItem: [('items.0.conv', 'items.0.bn'), ('items.1.conv', 'items.1.bn')],
              Nested: [(f'stages.{i}.{j}.conv', f'stages.{i}.{j}.bn') for i in range(2) for j in range(2)],
              CallsPartOfItem: [], PassesItem: []}

@pytest.mark.parametrize('block', list(ITEM_PAIRS))
def test_items_an_untraceable_parent_only_calls_fold_inside_each_without_a_sample(block):
    r = fold(block(), inputs=inputs(2, 4, 6, 6))
    assert sorted((p.layer, p.bn) for p in r.folded) == sorted(ITEM_PAIRS[block]), r
    if block is LoopsItems: assert reasons(r) == {'items.1.0': 'its input comes from the input of `items.1`, not a foldable layer'}
    if not ITEM_PAIRS[block]: assert all('fold with a sample to settle it' in why for why in reasons(r).values()), r

@pytest.mark.parametrize('block', [CallsPartOfItem, PassesItem])
def test_pairing_inside_items_reached_other_than_by_a_call_would_be_wrong(block, monkeypatch):
    monkeypatch.setattr(fastfold.pairs, '_not_shown', lambda v, g, untraceable: v)
    m = randomize_bn(block()).eval()
    folder = BN_Folder()
    folded = folder.fold(m)
    assert folder.report.folded
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad(): assert rel_diff(m(x), folded(x)) > 1e-2

class GetsByName(Add):
    "Reaches its container by `getattr(self, 'seq')`, then loops over its items with an add between"
    def forward(self, x):
        seq = getattr(self, 'seq') if hasattr(self, 'seq') else None
        for layer in seq: x = layer(x) + (x if x.shape[-1] > 1 else 0)
        return x

def test_a_child_reached_by_getattr_is_not_shown():
    r = fold(GetsByName(), inputs=inputs(2, 4, 6, 6))
    assert r.folded == [] and all('fold with a sample to settle it' in why for why in reasons(r).values()), r

class AddsUnlessMasked(nn.Module):
    def __init__(self, c=4): super().__init__(); self.conv,self.bn = nn.Conv2d(c, c, 1),nn.BatchNorm2d(c)
    def forward(self, x, mask=None):
        y = self.conv(x)
        if mask is None: y = y + x
        return self.bn(y)

class PassesKwargs(nn.Module):
    "Calls its child with `**kwargs`: whether `mask` is `None` there is not in the code (fx would trace it as given)"
    def __init__(self): super().__init__(); self.child = AddsUnlessMasked()
    def forward(self, x, **kwargs): return x if x.shape[-1] < 2 else self.child(x, **kwargs)

def test_a_child_called_with_kwargs_is_not_shown():
    r = fold(PassesKwargs(), inputs=inputs(2, 4, 6, 6))
    assert r.folded == [] and all('fold with a sample to settle it' in why for why in reasons(r).values()), r
