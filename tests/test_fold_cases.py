"Every BN flavour fastfold folds, and every case it must refuse (left in place with a reason, or an error)."
import copy
import pytest, torch, timm
from torch import nn
from torch.nn.utils import parametrizations
from torchvision.ops.misc import FrozenBatchNorm2d
from timm.layers import BatchNormAct2d, StdConv2d
from timm.layers.norm_act import FrozenBatchNormAct2d, convert_sync_batchnorm
from fastfold.layers import *
from fastfold.fold import *

def check_fold(model, x, n_folded, n_left=0, rtol=1e-5):
    "Fold `model` (randomised BN), check outputs, counts, and that the input model is untouched"
    model = randomize_bn(model).eval()
    sd = copy.deepcopy(model.state_dict())
    folder = BN_Folder(rtol=rtol)
    folded = folder.fold(model, sample=x)
    assert (len(folder.report.folded), len(folder.report.left)) == (n_folded, n_left), folder.report
    assert all(torch.equal(v, model.state_dict()[k]) for k,v in sd.items())
    return folded, folder.report

class Sandwich(nn.Module):
    def __init__(self, first, bn, after=None): super().__init__(); self.first,self.bn,self.after = first,bn,after or nn.Identity()
    def forward(self, x): return self.after(self.bn(self.first(x)))

# ---- flavours that fold ----
def test_batchnorm_1d_2d_3d():
    check_fold(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), torch.randn(2, 3, 9), 1)
    check_fold(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(2, 3, 9, 9), 1)
    check_fold(nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4)), torch.randn(2, 3, 5, 5, 5), 1)

@pytest.mark.parametrize('dims', [1, 2, 3])
def test_grouped_transposed_conv(dims):
    ct = getattr(nn, f'ConvTranspose{dims}d')(6, 9, 3, stride=2, groups=3, output_padding=1, dilation=1)
    bn = getattr(nn, f'BatchNorm{dims}d')(9)
    check_fold(nn.Sequential(ct, bn), torch.randn(2, 6, *[4]*dims), 1)

def test_depthwise_dilated_padded_conv():
    for mode in ('zeros', 'reflect', 'replicate', 'circular'):
        check_fold(nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False, padding_mode=mode),
                                 nn.BatchNorm2d(8)), torch.randn(2, 8, 9, 9), 1)

def test_affine_false():
    folded,_ = check_fold(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)), torch.randn(2, 3, 9, 9), 1)
    assert isinstance(folded[1], nn.Identity)

def test_linear_bn_and_create_head_order():
    check_fold(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), torch.randn(5, 6), 1)
    # fastai's create_head: BatchNorm1d -> Dropout -> Linear(bias=False) -> ReLU -> BatchNorm1d -> Dropout -> Linear
    head = nn.Sequential(nn.BatchNorm1d(8), nn.Dropout(0.25), nn.Linear(8, 6, bias=False), nn.ReLU(),
                         nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 2))
    folded,rep = check_fold(head, torch.randn(5, 8), 2)
    assert [p.where for p in rep.folded] == ['before', 'before']
    assert folded[2].bias is not None

def test_bn_between_two_linears_folds_once():
    folded,rep = check_fold(nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), torch.randn(5, 6), 1)
    assert rep.folded[0].where == 'after'

def test_syncbatchnorm():
    m = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                                               nn.Flatten(), nn.Linear(4*7*7, 5), nn.BatchNorm1d(5)))
    assert sum(isinstance(x, nn.SyncBatchNorm) for x in m.modules()) == 2
    check_fold(m, torch.randn(2, 3, 9, 9), 2)

def test_timm_batchnormact_keeps_activation_and_drop():
    bn = BatchNormAct2d(4, act_layer=nn.PReLU, drop_layer=nn.Dropout)
    folded,_ = check_fold(Sandwich(nn.Conv2d(3, 4, 3), bn), torch.randn(2, 3, 9, 9), 1)
    assert isinstance(folded.bn, nn.Sequential) and list(dict(folded.bn.named_children())) == ['drop', 'act']
    assert 'bn.act.weight' in folded.state_dict() # the PReLU's parameter keeps its state_dict name
    folded,_ = check_fold(Sandwich(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, apply_act=False)), torch.randn(2, 3, 9, 9), 1)
    assert isinstance(folded.bn, nn.Identity)

def test_timm_sync_batchnormact():
    m = convert_sync_batchnorm(Sandwich(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU)))
    assert type(m.bn).__name__ == 'SyncBatchNormAct'
    folded,_ = check_fold(m, torch.randn(2, 3, 9, 9), 1)
    assert isinstance(folded.bn.act, nn.ReLU)

def test_frozen_batchnorms():
    check_fold(Sandwich(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4)), torch.randn(2, 3, 9, 9), 1)
    folded,_ = check_fold(Sandwich(nn.Conv2d(3, 4, 3), FrozenBatchNormAct2d(4, act_layer=nn.ReLU)), torch.randn(2, 3, 9, 9), 1)
    assert isinstance(folded.bn.act, nn.ReLU)

def test_user_subclass_without_forward_override():
    class MyBN(nn.BatchNorm2d): pass
    check_fold(nn.Sequential(nn.Conv2d(3, 4, 3), MyBN(4)), torch.randn(2, 3, 9, 9), 1)

def test_registering_a_flavour():
    class ScaledBN(nn.BatchNorm2d): # a BN that always computes in float32: its float64 check cannot run
        def forward(self, x): return super().forward(x.float()).to(x.dtype)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBN(4))
    _,rep = check_fold(m, torch.randn(2, 3, 9, 9), 0, 1)
    assert 'could not be run on a float64 copy; register it in `BN_FLAVOURS`' in rep.left[0].reason
    BN_FLAVOURS[ScaledBN] = BNFlavour(identity_tail, 2)
    try: check_fold(m, torch.randn(2, 3, 9, 9), 1)
    finally: del BN_FLAVOURS[ScaledBN]

def test_tied_weights_are_untied_not_corrupted():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__(); self.a,self.b,self.bn = nn.Linear(4, 4),nn.Linear(4, 4),nn.BatchNorm1d(4)
            self.b.weight = self.a.weight
        def forward(self, x): return self.bn(self.a(x)) + self.b(x)
    folded,_ = check_fold(Tied(), torch.randn(5, 4), 1)
    assert folded.a.weight is not folded.b.weight

def test_cuda_style_device_and_dtype_kept():
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).to(torch.float64).eval()
    f = BN_Folder(rtol=1e-12).fold(m, sample=torch.randn(2, 3, 9, 9, dtype=torch.float64))
    assert f[0].weight.dtype == torch.float64

# ---- cases that must be left in place, with the reason ----
def left_reasons(model):
    folder = BN_Folder(); folder.fold(randomize_bn(model).eval())
    assert not folder.report.folded, folder.report
    return [l.reason for l in folder.report.left]

def test_refuses_bn_relu_conv():
    [r] = left_reasons(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3)))
    assert 'comes from `1` (ReLU)' in r

def test_refuses_layer_output_used_elsewhere():
    class Res(nn.Module):
        def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv2d(3, 3, 1),nn.BatchNorm2d(3)
        def forward(self, x): y = self.conv(x); return self.bn(y), y.mean()
    [r] = left_reasons(Res())
    assert 'also feeds' in r

def test_refuses_shared_layer():
    class Shared(nn.Module):
        def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv2d(3, 3, 1),nn.BatchNorm2d(3)
        def forward(self, x): return self.bn(self.conv(x)) + self.conv(x)
    [r] = left_reasons(Shared())
    assert 'called more than once' in r

def test_refuses_shared_bn_even_if_registered_twice():
    bn = nn.BatchNorm2d(3)
    class Twice(nn.Module):
        def __init__(self): super().__init__(); self.c1,self.c2,self.bn1,self.bn2 = nn.Conv2d(3,3,1),nn.Conv2d(3,3,1),bn,bn
        def forward(self, x): return self.bn1(self.c1(x)) + self.bn2(self.c2(x))
    assert left_reasons(Twice()) == ['it is called 2 times']

def test_refuses_no_running_stats():
    [r] = left_reasons(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)))
    assert 'track_running_stats=False' in r

def test_refuses_hooked_modules():
    for i in (0, 1):
        m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        m[i].register_forward_hook(lambda *a: None)
        [r] = left_reasons(m)
        assert 'hooks' in r

def test_refuses_weight_standardised_conv():
    from timm.layers import ScaledStdConv2d
    for conv in (StdConv2d(3, 4, 3), ScaledStdConv2d(3, 4, 3)):
        [r] = left_reasons(nn.Sequential(conv, nn.BatchNorm2d(4)))
        assert f'`{type(conv).__name__}.forward` transforms its weight before use' in r

def test_refuses_parametrized_conv():
    [r] = left_reasons(nn.Sequential(parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)))
    assert 'parametrizations' in r

def test_refuses_activation_bn_before_linear():
    # timm's BatchNormAct2d applies its activation after normalising: it can't be moved into the next layer (a 1x1 conv
    # with no padding, which a plain BN before it would fold into)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), BatchNormAct2d(4, act_layer=nn.ReLU), nn.Conv2d(4, 4, 1))
    [r] = left_reasons(m)
    assert r == 'it has an activation inside, which must come before the conv'

def test_untraceable_block_only_loses_its_own_boundary():
    class Gate(nn.Module):
        def __init__(self): super().__init__(); self.conv,self.bn = nn.Conv2d(3, 3, 1),nn.BatchNorm2d(3)
        def forward(self, x): return self.bn(self.conv(x)) if x.sum() > 0 else x
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), Gate(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    x = torch.rand(2, 3, 5, 5)
    folded,rep = check_fold(m, x, 2, 1)
    assert [n for n,_ in rep.untraceable] == ['2'] and rep.left[0].bn == '2.bn'
    with torch.no_grad(): gate_ran = m[:2](x).sum() > 0 # what the sample made `Gate` do
    read = 'the sample run pairs it with `2.conv`, but reads tensor values (`bool` in `2`): it shows one path of several'
    assert rep.left[0].reason == (read if gate_ran else 'never called on the sample input')
    folder = BN_Folder(); folder.fold(m) # without a sample fastfold can't know whether it runs
    assert folder.report.left[0].reason == 'inside untraceable `2`, not reached by tracing'
    with torch.no_grad(): # an input that takes the other branch (the first two layers are affine in `x`)
        other = next(t for t in (torch.full_like(x, v) for v in (-100., 100.)) if (m[:2](t).sum() > 0) != gate_ran)
    folder.fold(m, sample=other)
    assert folder.report.left[0].reason == ('never called on the sample input' if gate_ran else read)

# ---- errors ----
def test_errors_leave_model_untouched():
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).eval()
    m[3].running_var[1] = float('nan')
    sd = copy.deepcopy(m.state_dict())
    for inplace in (False, True):
        with pytest.raises(ValueError, match='`3` has non-finite running_var'): BN_Folder().fold(m, inplace=inplace)
        assert all(torch.equal(v, m.state_dict()[k]) or torch.isnan(v).any() for k,v in sd.items())
        assert [type(x) for x in m] == [nn.Conv2d, nn.BatchNorm2d]*2

def test_bad_inputs():
    with pytest.raises(TypeError, match='expects an nn.Module'): BN_Folder().fold(torch.randn(3))
    with pytest.raises(TypeError, match='TorchScript'): BN_Folder().fold(torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1))))
    with pytest.raises(TypeError, match='DataParallel'): BN_Folder().fold(nn.DataParallel(nn.Conv2d(3, 3, 1)))

def test_timm_conv2d_same_folds():
    from timm.layers import Conv2dSame
    check_fold(nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.BatchNorm2d(4)), torch.randn(2, 3, 9, 9), 1)
