"`FreezeBN(fuse=True)` computes each frozen BN inside the layer before it: the same fit as unfused to float32 rounding, less kept for backward, and nothing else changes (state_dict, restore after errors, export, what is not fused)."
import copy
import pytest, torch
from torch import nn
import torch.nn.functional as F
from functools import partial
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.training import GradientClip
from fastai.torch_core import params
from fastai.vision.learner import vision_learner
from torchvision.models import resnet18
from timm.layers import BatchNormAct2d
from fastfold.freeze import FreezeBN, freeze_bn, fuse_frozen_bn, freezable_bn_layers
from _shared import one_torch_thread, image_dls as shared_image_dls

image_dls = partial(shared_image_dls, shuffle=False) # fused and unfused fits see the same batches

def pretend_pretrained(model, seed=1):
    "Non-trivial BN statistics and parameters, as a pretrained model has"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in freezable_bn_layers(model):
            c = bn.running_mean.numel()
            u = lambda lo, hi: torch.rand(c, generator=g)*(hi-lo)+lo
            bn.running_mean.copy_(u(-0.5, 0.5)); bn.running_var.copy_(u(0.5, 2))
            if bn.weight is not None: bn.weight.copy_(u(0.5, 1.5)); bn.bias.copy_(u(-0.5, 0.5))
    return model

def conv_bn_net(bn=nn.BatchNorm2d, **bn_kw):
    "Conv body with 2d BN (a conv without bias, one with), pooled head with a BatchNorm1d"
    torch.manual_seed(0)
    return pretend_pretrained(nn.Sequential(
        nn.Sequential(nn.Conv2d(3,8,3,stride=2,padding=1), bn(8, **bn_kw), nn.ReLU(),
                      nn.Conv2d(8,8,3,stride=2,padding=1,bias=False), bn(8, **bn_kw), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,8), nn.BatchNorm1d(8), nn.Linear(8,2))))

def body_head(m): return [params(m[0]), params(m[1])]

class Record(Callback):
    "The loss of every training batch, the gradients of the first step, and the modules' `__dict__` keys seen in each forward"
    order = 60
    def before_fit(self): self.losses,self.grads = [],None
    def after_loss(self):
        if self.training: self.losses.append(self.loss.item())
    def after_backward(self):
        if self.grads is None: self.grads = {n: p.grad.clone() for n,p in self.learn.model.named_parameters() if p.grad is not None}

def fit(model_fn, fuse, cbs=(), n_epochs=1, lr=0.05, stop_grads=True, **kwargs):
    "A `Learner` with SGD on `model_fn()` and `FreezeBN(fuse=fuse)`, after `fit(n_epochs)`"
    learn = Learner(image_dls(), model_fn(), loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=lr, splitter=body_head,
                    cbs=[FreezeBN(fuse=fuse, stop_grads=stop_grads), Record(), *cbs], **kwargs)
    torch.manual_seed(0)
    learn.fit(n_epochs)
    return learn

def rel(a, b): return ((a.double()-b.double()).norm()/b.double().norm().clamp_min(1e-30)).item()

def check_same_fit(fused, unfused, grad_tol=1e-5, weight_tol=1e-5, loss_tol=1e-6):
    "First-step loss and gradients, then every weight after the fit, equal to float32 rounding"
    assert fused.record.losses[0] == pytest.approx(unfused.record.losses[0], rel=loss_tol)
    assert fused.record.losses == pytest.approx(unfused.record.losses, rel=1e-4)
    assert fused.record.grads.keys() == unfused.record.grads.keys()
    total = torch.cat([g.flatten() for g in unfused.record.grads.values()]).norm()
    fused_layers = {f'{p.pair.layer}.weight' for p in fused.freeze_bn.fusion.pairs}
    assert fused_layers <= set(unfused.record.grads)
    for k,g in unfused.record.grads.items():
        d = (fused.record.grads[k]-g).norm()
        if k in fused_layers: assert d <= grad_tol*g.norm(), k   # the fused layers' weights: relative to their gradient
        else: assert d <= grad_tol*(g.norm() + total), k         # a gradient of ~0 (a bias before a live BN) is ~0 give or take rounding
    sd_f,sd_u = fused.model.state_dict(),unfused.model.state_dict()
    assert list(sd_f) == list(sd_u)
    for k,v in sd_u.items():
        if v.is_floating_point(): assert rel(sd_f[k], v) < weight_tol, k

def test_fused_fit_equals_unfused_fit():
    "The same fit, fused and unfused: loss, gradients and weights agree to float32 rounding; the head's live BN is not fused"
    fused,unfused = fit(conv_bn_net, True, wd=0.01),fit(conv_bn_net, False, wd=0.01)
    assert fused.freeze_bn.fused == ['0.1', '0.4'] and unfused.freeze_bn.fused == []
    check_same_fit(fused, unfused)
    assert not torch.equal(fused.model[0][0].weight, conv_bn_net()[0][0].weight)   # it trained
    assert 'not fused' not in fused.freeze_bn.fusion.report()

def test_resnet18_fused_fit_equals_unfused_fit():
    "A `vision_learner` resnet18 at 32 px (freeze, fit, unfreeze, fit), with gradient clipping and weight decay: the same weights"
    def learner(fuse):
        torch.manual_seed(0)
        learn = vision_learner(image_dls(bs=4, n=8), resnet18, pretrained=False, n_out=2, loss_func=CrossEntropyLossFlat(),
                               opt_func=SGD, lr=0.05, wd=0.01, cbs=[FreezeBN(fuse=fuse, head=True), Record(), GradientClip(1.)])
        pretend_pretrained(learn.model)
        return learn
    fused,unfused = learner(True),learner(False)
    for learn in (fused, unfused):   # the same dropout masks in the head
        torch.manual_seed(0); learn.freeze(); learn.fit(1); learn.unfreeze(); learn.fit(1)
    assert len(fused.freeze_bn.fused) == 20 and unfused.freeze_bn.fused == []   # the body's 20; the head's BatchNorm1d follow no layer
    # `head=True`: a live BatchNorm1d normalising over 4 samples magnifies rounding (the first loss then differs by ~1e-4)
    check_same_fit(fused, unfused, grad_tol=1e-4, loss_tol=1e-5)

def saved_bytes(model, x, y, fusion=None):
    "Bytes of the distinct storages autograd keeps for backward in one training step"
    seen = {}
    def pack(t):
        s = t.untyped_storage(); seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if fusion is not None: fusion.on()
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(seen.values())

def test_fused_step_keeps_less_for_backward():
    "Conv-BN-ReLU blocks at 64 px: the fused step keeps one activation fewer per pair for backward (about 2/3 of the bytes)"
    torch.manual_seed(0)
    model = pretend_pretrained(nn.Sequential(*[m for i in range(3) for m in (nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())],
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2)))
    x,y = torch.randn(4, 3, 64, 64),torch.tensor([0, 1, 0, 1])
    frozen = freeze_bn(model)
    fusion = fuse_frozen_bn(model, frozen, (x,))
    assert len(fusion.fused) == 3
    unfused,fused = saved_bytes(model, x, y),saved_bytes(model, x, y, fusion)
    print(f'3 conv-BN-ReLU blocks, 64 px, batch 4: {unfused:,} -> {fused:,} bytes saved for backward ({fused/unfused:.2f}x)')
    assert fused <= 0.7*unfused
    frozen.restore()

class ConvOutUsedTwice(nn.Module):
    "A conv whose output feeds its BN and, past it, the block's output: folding the BN into the conv would change that sum"
    def __init__(self):
        super().__init__()
        self.conv,self.bn = nn.Conv2d(3,3,3,padding=1),nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3,2))
    def forward(self, x):
        y = self.conv(x)
        return self.head(F.relu(self.bn(y)) + y)

class SharedConv(nn.Module):
    "One conv called twice, each output with its own BN"
    def __init__(self):
        super().__init__()
        self.conv,self.bn1,self.bn2 = nn.Conv2d(3,3,3,padding=1),nn.BatchNorm2d(3),nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3,2))
    def forward(self, x): return self.head(self.bn1(self.conv(x)) + self.bn2(self.conv(x)))

class ConvThenFlatBN(nn.Module):
    "A Linear -> reshape -> BN pair: foldable (`through`), but only a BN right after its layer is fused"
    def __init__(self):
        super().__init__()
        self.conv,self.bn = nn.Conv2d(3,4,3,padding=1),nn.BatchNorm2d(4)
        self.lin,self.bn1 = nn.Linear(4*32*32, 6),nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)
    def forward(self, x): return self.out(self.bn1(self.lin(self.bn(self.conv(x)).flatten(1)).view(-1, 6)))

@pytest.mark.parametrize('model_fn,reason', [
    (ConvOutUsedTwice, 'also feeds'),
    (SharedConv, 'called'),
])
def test_not_fused_where_the_fold_is_not_exact(model_fn, reason):
    "A conv whose output is also used elsewhere, a conv called twice: not fused, and the fit is still the unfused one"
    make = lambda: pretend_pretrained((torch.manual_seed(0), model_fn())[1])
    one_group = lambda m: params(m)
    fused = Learner(image_dls(), make(), loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=0.05, splitter=one_group, cbs=[FreezeBN(), Record()])
    unfused = Learner(image_dls(), make(), loss_func=CrossEntropyLossFlat(), opt_func=SGD, lr=0.05, splitter=one_group, cbs=[FreezeBN(fuse=False), Record()])
    fused.fit(1); unfused.fit(1)
    check_same_fit(fused, unfused)
    assert fused.freeze_bn.fused == []
    assert reason in fused.freeze_bn.fusion.report(), fused.freeze_bn.fusion.report()

def test_only_bn_right_after_its_layer_is_fused():
    model = pretend_pretrained(ConvThenFlatBN())
    x = torch.randn(2, 3, 32, 32)
    frozen = freeze_bn(model)
    fusion = fuse_frozen_bn(model, frozen, (x,))
    assert fusion.fused == ['bn']
    assert [l.bn for l in fusion.left] == ['bn1'] and 'through' in fusion.left[0].reason
    frozen.restore()

def module_state(model):
    "What must come back exactly: each module's `__dict__` keys, hooks, and the tensors of the state_dict"
    return ([sorted(vars(m)) for m in model.modules()], [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
            {k: (v.data_ptr(), v.clone()) for k,v in model.state_dict().items()})

def same_state(a, b):
    return a[0] == b[0] and a[1] == b[1] and a[2].keys() == b[2].keys() and all(
        a[2][k][0] == b[2][k][0] and torch.equal(a[2][k][1], b[2][k][1]) for k in a[2])

class StateDuringForward(Callback):
    "In the middle of each training forward (a hook on the ReLU after the first fused pair): the state_dict's keys and tensors"
    def before_fit(self): self.seen = []; self.h = self.learn.model[0][2].register_forward_hook(self.look)
    def look(self, m, i, o):
        if self.training: self.seen.append({k: v.data_ptr() for k,v in self.learn.model.state_dict().items()})
    def after_fit(self): self.h.remove()

def test_state_dict_during_the_fit():
    "During the forward and at every event, the state_dict has the same keys and the same tensors as unfused"
    learn = Learner(image_dls(), conv_bn_net(), loss_func=CrossEntropyLossFlat(), splitter=body_head, cbs=[FreezeBN()])
    want = {k: v.data_ptr() for k,v in learn.model.state_dict().items()}
    probe = StateDuringForward()
    learn.fit(1, cbs=probe)
    assert len(probe.seen) == 4 and all(s == want for s in probe.seen)
    assert learn.freeze_bn.fused == ['0.1', '0.4']

class Boom(Callback):
    "Raise `ex` in the forward of the second training batch (inside the model), or at its `after_batch`"
    def __init__(self, ex, in_forward): self.ex,self.in_forward = ex,in_forward
    def before_fit(self): self.h = self.learn.model[0][5].register_forward_hook(self.boom) if self.in_forward else None
    def boom(self, *_):
        if self.training and self.iter == 1: raise self.ex
    def after_batch(self):
        if not self.in_forward and self.training and self.iter == 1: raise self.ex
    def after_fit(self): self.h is not None and self.h.remove()

@pytest.mark.parametrize('in_forward', [True, False])
@pytest.mark.parametrize('ex', [RuntimeError('boom'), CancelFitException()])
def test_model_as_it_was_after_an_error(ex, in_forward):
    "An error in the forward or after it, a cancelled fit: the model's modules have the same `__dict__`, no hook, the same tensors"
    learn = Learner(image_dls(), conv_bn_net(), loss_func=CrossEntropyLossFlat(), splitter=body_head, cbs=[FreezeBN()])
    before = module_state(learn.model)
    boom = Boom(ex, in_forward)
    try: learn.fit(1, cbs=boom)
    except RuntimeError: pass
    if boom.h is not None: boom.h.remove()
    after = module_state(learn.model)
    assert after[0] == before[0] and after[1] == before[1]          # no `forward` left on any module, no hook
    assert not any('forward' in vars(m) for m in learn.model.modules())
    assert learn.freeze_bn.fused == ['0.1', '0.4']

def pets_dls(n=16, size=32):
    "`n` Pets images (an exportable fastai `DataLoaders`: `learn.export` pickles its empty copy)"
    from fastai.data.block import DataBlock, CategoryBlock
    from fastai.data.transforms import RegexLabeller
    from fastai.data.external import untar_data, URLs
    from fastai.vision.data import ImageBlock
    from fastai.vision.augment import Resize
    files = sorted((untar_data(URLs.PETS)/'images').glob('*.jpg'))[:n]
    return DataBlock(blocks=(ImageBlock, CategoryBlock), get_y=RegexLabeller(r'^(.*)_\d+\.jpg$', match=True),
                     item_tfms=Resize(size)).dataloaders(files, bs=4, num_workers=0, device='cpu')

def test_export_during_and_after_a_fused_fit(tmp_path):
    "`learn.export()` with `FoldOnExport` in the middle of a fused fit and after it: checked files, without fastfold; `learn.fold()` after"
    from fastfold.export import FoldOnExport, check_export_file, fold   # patches `Learner.export`/`Learner.fold`
    class ExportMidFit(Callback):
        order = 70
        def after_batch(self):
            if self.training and self.iter == 1: # leaves first: the test's own class is not what the export checks
                learn = self.learn
                learn.remove_cb(self); learn.export('mid.pkl'); self.done = True
    model = conv_bn_net()
    model[1][-1] = nn.Linear(8, 3)   # the first 16 Pets images hold 3 breeds
    learn = Learner(pets_dls(), model, loss_func=CrossEntropyLossFlat(), splitter=body_head, path=tmp_path, cbs=[FreezeBN(), FoldOnExport()])
    mid = ExportMidFit()
    with learn.no_bar(): learn.fit(1, cbs=mid)   # the progress bar's `learn.logger` mid-fit is a bound method the checking loader refuses
    assert mid.done
    learn.export('after.pkl')
    for f in ('mid.pkl', 'after.pkl'): check_export_file(tmp_path/f)
    assert learn.fold_on_export.report.left == [] and len(learn.fold_on_export.report.folded) == 3
    assert learn.freeze_bn.fused == ['0.1', '0.4']
    loss = learn.validate()[0]
    assert learn.freeze_bn.fused == ['0.1', '0.4']   # `validate` runs `before_fit` too, but trains nothing: the report stays
    learn.fold()
    assert len(freezable_bn_layers(learn.model)) == 0
    assert abs(learn.validate()[0] - loss) < 1e-4

def test_timm_batchnorm_act_keeps_its_activation():
    "timm's `BatchNormAct2d`: fused, its SiLU kept; the fit equals the unfused one"
    def net():
        torch.manual_seed(0)
        return pretend_pretrained(nn.Sequential(
            nn.Sequential(nn.Conv2d(3,8,3,stride=2,padding=1), BatchNormAct2d(8, act_layer=nn.SiLU),
                          nn.Conv2d(8,8,3,stride=2,padding=1), BatchNormAct2d(8, act_layer=nn.ReLU)),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,2))))
    fused,unfused = fit(net, True),fit(net, False)
    assert fused.freeze_bn.fused == ['0.1', '0.3']
    check_same_fit(fused, unfused)

def test_bn_back_in_train_mode_is_not_fused():
    "A fused BN that something puts back in train mode is computed by its own `forward` (batch statistics, buffers updated)"
    model = conv_bn_net()
    x = torch.randn(4, 3, 32, 32)
    frozen = freeze_bn(model[0])
    fusion = fuse_frozen_bn(model, frozen, (x,))
    ref = copy.deepcopy(model).train()
    model.train()                                   # no `set_eval`: the body's BN train
    with fusion: y = model(x)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(model[0][1].running_mean, ref[0][1].running_mean)
    frozen.restore()

@pytest.mark.parametrize('channels_last', [False, True])
def test_cpu_bf16_autocast_and_channels_last(channels_last):
    """One step under CPU bfloat16 autocast (fastai's `MixedPrecision` autocasts on CUDA only, so the step is run directly),
    fused and unfused, channels_last too: the fused step is as close to float32 as the unfused one"""
    model = conv_bn_net()
    x,y = torch.randn(4, 3, 32, 32),torch.tensor([0, 1, 1, 0])
    if channels_last: model,x = model.to(memory_format=torch.channels_last),x.to(memory_format=torch.channels_last)
    frozen = freeze_bn(model)
    fusion = fuse_frozen_bn(model, frozen, (x,))
    assert fusion.fused == ['0.1', '0.4', '1.3']
    res = {}
    for arm in ('float32', 'bf16', 'bf16 fused'):
        model.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=arm != 'float32'):
            if arm == 'bf16 fused': fusion.on()
            out = model(x)
            assert out.dtype == (torch.float32 if arm == 'float32' else torch.bfloat16)
            F.cross_entropy(out.float(), y).backward()
        res[arm] = [out.float(), *(model.get_submodule(f'{p.pair.layer}.weight'.rpartition('.')[0]).weight.grad.clone() for p in fusion.pairs)]
        assert not any('forward' in vars(m) for m in model.modules())
    for ref,unf,fus in zip(*res.values()):
        assert rel(fus, ref) < 2e-2 and rel(fus, ref) < 3*rel(unf, ref) + 1e-3, (rel(fus, ref), rel(unf, ref))
    if channels_last: assert model[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    frozen.restore()

def test_fuse_argument():
    with pytest.raises(TypeError, match='`fuse`'): FreezeBN(fuse='yes')

def transpose_linear_net():
    "A grouped ConvTranspose2d -> BN2d and a Linear -> BatchNorm1d pair (the other weight layouts), in the body"
    torch.manual_seed(0)
    return pretend_pretrained(nn.Sequential(
        nn.Sequential(nn.Conv2d(3,8,3,stride=2,padding=1), nn.ReLU(), nn.ConvTranspose2d(8,8,2,stride=2,groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,6,bias=False), nn.BatchNorm1d(6), nn.ReLU()),
        nn.Sequential(nn.Linear(6,2))))

@pytest.mark.parametrize('stop_grads', [True, False])
def test_conv_transpose_and_linear_pairs(stop_grads):
    "ConvTranspose and Linear pairs fused, the fit equal to unfused; with `stop_grads=False` the BN's own weight and bias train through the fused layer alike"
    fused,unfused = fit(transpose_linear_net, True, stop_grads=stop_grads),fit(transpose_linear_net, False, stop_grads=stop_grads)
    assert fused.freeze_bn.fused == ['0.3', '0.8']
    check_same_fit(fused, unfused)
    bn_w = fused.model[0][3].weight
    assert torch.equal(bn_w, transpose_linear_net()[0][3].weight) == stop_grads   # trained only with `stop_grads=False`

def test_not_fused_in_data_parallel_or_with_an_instance_forward():
    "`nn.DataParallel` copies each module's `__dict__` to its replicas; a module with its own instance `forward` is someone else's"
    model = conv_bn_net()
    frozen = freeze_bn(model)
    fusion = fuse_frozen_bn(nn.DataParallel(model), frozen)
    assert fusion.fused == [] and 'DataParallel' in fusion.left[0].reason and len(fusion.left) == 3
    model[0][0].forward = model[0][0].forward   # e.g. a library's patch
    fusion = fuse_frozen_bn(model, frozen)
    assert fusion.fused == ['0.4', '1.3'] and 'instance `forward`' in fusion.report()
    frozen.restore()

def test_error_before_the_forward_left_until_restore():
    "An error raised by a later callback's `before_batch` (fusing on, no forward): the forwards stay until `restore()` or the next fit"
    class BoomBeforeBatch(Callback):
        order = 50
        def before_batch(self):
            if self.training: raise RuntimeError('boom')
    learn = Learner(image_dls(), conv_bn_net(), loss_func=CrossEntropyLossFlat(), splitter=body_head, cbs=[FreezeBN()])
    before = module_state(learn.model)
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=BoomBeforeBatch())
    assert sum('forward' in vars(m) for m in learn.model.modules()) == 5   # 2 layers, 2 BN, the model
    learn.freeze_bn.restore()
    assert same_state(module_state(learn.model), before)

def test_not_fused_with_timm_activation_checkpointing():
    "timm's `set_grad_checkpointing()`: its checkpoints recompute the forward unfused in backward, so nothing is fused and the fit runs"
    import timm
    def net():
        torch.manual_seed(0)
        body = timm.create_model('resnet18', pretrained=False, num_classes=0)
        body.set_grad_checkpointing()
        return pretend_pretrained(nn.Sequential(body, nn.Sequential(nn.Linear(512, 2))))
    learn = fit(net, True)
    assert learn.freeze_bn.fused == [] and 'checkpointing' in learn.freeze_bn.fusion.report()
    body = net()[0]
    body.set_grad_checkpointing(False)
    assert len(fuse_frozen_bn(body, freeze_bn(body)).fused) == 20   # the same body without checkpointing: every BN fused
