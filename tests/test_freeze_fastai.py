"`FreezeBN` against the heavier fastai machinery: its default on `vision_learner`, `unet_learner` and a one-group `Learner`, `fine_tune`, one-cycle, mixed precision, gradient accumulation, channels last, SyncBatchNorm and timm's BatchNormAct2d; with and without `fuse` where fusing touches the same machinery."
import warnings
import pytest, torch
from torch import nn
from torch.utils.data import TensorDataset
from fastcore.basics import ifnone
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.callback.fp16 import MixedPrecision  # patches `Learner.to_fp16`/`to_bf16`
from fastai.callback.channelslast import ChannelsLast  # patches `Learner.to_channelslast`
from fastai.callback.schedule import fit_one_cycle  # patches `Learner.fit_one_cycle`/`fine_tune`
from fastai.torch_core import params
from fastai.vision.learner import vision_learner, unet_learner
from torchvision.models import resnet18
from timm.layers import BatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm as timm_convert_sync_batchnorm
from fastfold.freeze import FreezeBN, freezable_bn_layers
from _shared import one_torch_thread, image_dls

def conv_bn_net(bn=nn.BatchNorm2d, **bn_kw):
    "Conv body with 2d BN, pooled head with a BatchNorm1d"
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3,8,3,stride=2,padding=1), bn(8, **bn_kw), nn.ReLU(),
                      nn.Conv2d(8,8,3,stride=2,padding=1), bn(8, **bn_kw), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(8), nn.Linear(8,2)))

def pretend_pretrained(model):
    "Non-trivial BN statistics and parameters, as a pretrained model has"
    torch.manual_seed(1)
    with torch.no_grad():
        for bn in freezable_bn_layers(model):
            if bn.running_mean is not None: bn.running_mean.uniform_(-1,1); bn.running_var.uniform_(0.5,2)
            if bn.weight is not None: bn.weight.uniform_(0.5,1.5); bn.bias.uniform_(-0.5,0.5)
    return model

def conv_learner(model=None, **kwargs):
    model = pretend_pretrained(model if model is not None else conv_bn_net())
    return Learner(image_dls(), model, loss_func=CrossEntropyLossFlat(), lr=1e-2,
                   splitter=lambda m: [params(m[0]), params(m[1])], **kwargs)

class BNProbe(Callback):
    "At each training batch, record the mode of every BN layer and the `requires_grad` of every BN parameter"
    order = 50
    def __init__(self, part=None): self.part = part  # look only at the BN in this part of the model
    def before_fit(self): self.modes,self.bn_grads,self.types = [],[],set()
    def after_pred(self):
        if not self.training: return
        bns = freezable_bn_layers(ifnone(self.part, self.learn.model))
        self.modes += [bn.training for bn in bns]
        self.bn_grads += [p.requires_grad for bn in bns for p in bn.parameters(recurse=False)]
        self.types |= {type(bn) for bn in bns}

def bn_tensors(model):
    return [t.detach().clone() for bn in freezable_bn_layers(model) for t in (*bn.parameters(recurse=False), *bn.buffers(recurse=False))]

def other_params(model):
    bn_ids = {id(p) for bn in freezable_bn_layers(model) for p in bn.parameters(recurse=False)}
    return [(n, p.detach().clone()) for n,p in model.named_parameters() if id(p) not in bn_ids]

def flags(model): return [p.requires_grad for p in model.parameters()]

def check_frozen_fit(learn, fit, bn_model=None, changed=True, unused=(), n_fused=None):
    "Run `fit` and check every BN of `bn_model` stayed frozen, the other weights moved, the flags came back, `n_fused` BN were fused"
    probe = BNProbe(bn_model)
    bn_model = ifnone(bn_model, learn.model)
    learn.add_cb(probe); learn.add_cb(KeepFreezeBN()); _last_freeze_bn.clear()
    bn0,other0,flags0 = bn_tensors(bn_model),other_params(learn.model),flags(learn.model)
    assert len(bn0) > 0
    fit()
    assert probe.modes and not any(probe.modes), 'a BN layer was in train mode during a training batch'
    assert not any(probe.bn_grads), 'a BN parameter required grad during a training batch'
    for a,b in zip(bn_tensors(bn_model), bn0): assert torch.equal(a, b)
    if changed:
        unchanged = [n for (n,a),(_,b) in zip(other_params(learn.model), other0) if torch.equal(a, b) and n not in unused]
        assert not unchanged, f'weights that did not train: {unchanged}'
    assert flags(learn.model) == flags0
    assert not any('forward' in vars(m) for m in learn.model.modules()), 'a fused forward was left on the model'
    if n_fused is not None: assert len(fused_in(learn)) == n_fused, fused_in(learn)
    learn.remove_cb(probe); learn.remove_cb(learn.keep_freeze_bn)
    return probe

_last_freeze_bn = []
class KeepFreezeBN(Callback):
    "Keep the `FreezeBN` of the last fit, even one passed to `fit(cbs=...)` (removed after the fit)"
    order = 90
    def after_fit(self): _last_freeze_bn[:] = [cb for cb in self.learn.cbs if isinstance(cb, FreezeBN)]

def fused_in(learn):
    "The BN the last fit's `FreezeBN` fused"
    return _last_freeze_bn[0].fused if _last_freeze_bn else []

def check_body_frozen_head_live(learn, fit, body, head_bns, n_fused=None):
    "Run `fit`: every BN of `body` frozen (eval mode, bit-identical, no grads), the BN layers `head_bns` live and learning"
    head0 = [t.clone() for bn in head_bns for t in (bn.weight, bn.running_mean)]
    head_modes = []
    class HeadProbe(Callback):
        order = 50
        def after_pred(self):
            if self.training: head_modes.extend(bn.training for bn in head_bns)
    probe = check_frozen_fit(learn, lambda: fit(HeadProbe()), bn_model=body, changed=False, n_fused=n_fused)
    assert head_bns and head_modes and all(head_modes), 'a BN of the last parameter group was frozen'
    assert not any(torch.equal(a, b) for a,b in zip([t for bn in head_bns for t in (bn.weight, bn.running_mean)], head0))
    return probe

@pytest.mark.parametrize('fuse', [True, False])
def test_vision_learner_default_freezes_body_not_head(fuse):
    "`FreezeBN()` on a `vision_learner`: the body's BN frozen (and fused) in both fits of `fine_tune`, the new head's `BatchNorm1d` live"
    learn = vision_learner(image_dls(), resnet18, pretrained=False, n_out=2, loss_func=CrossEntropyLossFlat(), cbs=FreezeBN(fuse=fuse))
    pretend_pretrained(learn.model)
    head_bns = list(freezable_bn_layers(learn.model[1]))
    assert len(head_bns) == 2 and len(freezable_bn_layers(learn.model[0])) == 20
    check_body_frozen_head_live(learn, lambda cb: learn.fine_tune(1, freeze_epochs=1, cbs=cb), learn.model[0], head_bns, 20 if fuse else 0)
    assert all(flags(learn.model))

def test_vision_learner_freeze_unfreeze_between_fits():
    "`freeze()`, fit, `unfreeze()`, fit: the same choice in both fits, and the flags as fastai set them after each"
    learn = vision_learner(image_dls(), resnet18, pretrained=False, n_out=2, loss_func=CrossEntropyLossFlat(), cbs=FreezeBN())
    pretend_pretrained(learn.model)
    head_bns = list(freezable_bn_layers(learn.model[1]))
    learn.freeze()
    frozen_flags = flags(learn.model)
    assert not all(frozen_flags) and any(frozen_flags)
    check_body_frozen_head_live(learn, lambda cb: learn.fit(1, cbs=cb), learn.model[0], head_bns)
    assert flags(learn.model) == frozen_flags
    learn.unfreeze()
    check_body_frozen_head_live(learn, lambda cb: learn.fit(1, cbs=cb), learn.model[0], head_bns)
    assert all(flags(learn.model))

def test_vision_learner_head_true():
    "`FreezeBN(head=True)`: every BN frozen, the head's too, through `fine_tune`; flags as `unfreeze` left them"
    learn = vision_learner(image_dls(), resnet18, pretrained=False, n_out=2, loss_func=CrossEntropyLossFlat(), cbs=FreezeBN(head=True))
    pretend_pretrained(learn.model)
    check_frozen_fit(learn, lambda: learn.fine_tune(1, freeze_epochs=1))
    assert all(flags(learn.model))

def seg_dls(n=8, bs=4, size=32, seed=0):
    "Random images with a per-pixel label: whether channel 0 is brighter than channel 1 there"
    g = torch.Generator().manual_seed(seed)
    def ds(n):
        x = torch.randn(n, 3, size, size, generator=g)
        return TensorDataset(x, (x[:,0] > x[:,1]).long())
    return DataLoaders.from_dsets(ds(n), ds(n//2), bs=bs, device='cpu')

@pytest.mark.parametrize('fuse', [True, False])
def test_unet_learner_default_freezes_encoder_not_decoder(fuse):
    "`unet_learner` splits a ResNet in three groups, the new decoder last: its BN stay live, the encoder's are frozen (and fused)"
    learn = unet_learner(seg_dls(), resnet18, pretrained=False, n_out=2, normalize=False,
                         loss_func=CrossEntropyLossFlat(axis=1), cbs=FreezeBN(fuse=fuse))
    pretend_pretrained(learn.model)
    assert len(learn.splitter(learn.model)) == 3
    encoder = learn.model[0]
    enc_ids = {id(bn) for bn in freezable_bn_layers(encoder)}
    decoder_bns = [bn for bn in freezable_bn_layers(learn.model) if id(bn) not in enc_ids]
    assert len(enc_ids) == 20 and len(decoder_bns) > 0
    check_body_frozen_head_live(learn, lambda cb: learn.fine_tune(1, freeze_epochs=1, cbs=cb), encoder, decoder_bns, 20 if fuse else 0)

def test_one_group_learner_freezes_every_bn():
    "A plain `Learner` (fastai's default splitter: one parameter group) keeps the old behaviour: every BN frozen, the head's too"
    model = nn.Sequential(*conv_bn_net(), nn.BatchNorm1d(2))   # the last parameter is a BN's, as in a head with `bn_final=True`
    learn = Learner(image_dls(), pretend_pretrained(model), loss_func=CrossEntropyLossFlat(), lr=1e-2, cbs=FreezeBN())
    assert all(isinstance(p, torch.Tensor) for p in learn.splitter(learn.model))   # one flat list: one parameter group
    probe = check_frozen_fit(learn, lambda: learn.fit_one_cycle(1))
    assert len(probe.modes) == 4*4   # 4 BN layers x 4 batches, all in eval mode

def test_folded_learner_predicts_with_freezebn_attached():
    "After `learn.fold()` no BN is left: `validate`/`predict` still work with FreezeBN attached; a fit fails before its first step"
    from fastfold.export import fold   # patches `Learner.fold`
    learn = conv_learner(cbs=FreezeBN())
    learn.fit(1)
    loss = learn.validate()[0]
    learn.fold()
    assert len(freezable_bn_layers(learn.model)) == 0
    assert abs(learn.validate()[0] - loss) < 1e-4
    learn.get_preds()
    w0 = [p.clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match='no BatchNorm'): learn.fit(1)
    assert all(torch.equal(a, b) for a,b in zip(learn.model.parameters(), w0))

def test_vision_learner_body_only():
    "Freezing only the body (`learn.model[0]`) keeps the head's BN live"
    learn = vision_learner(image_dls(), resnet18, pretrained=False, n_out=2, loss_func=CrossEntropyLossFlat())
    pretend_pretrained(learn.model)
    head0 = bn_tensors(learn.model[1])
    head_probe = BNProbe(learn.model[1])
    check_frozen_fit(learn, lambda: learn.fine_tune(1, freeze_epochs=1, cbs=[FreezeBN(learn.model[0]), head_probe]),
                     bn_model=learn.model[0], changed=False)
    assert len(freezable_bn_layers(learn.model[1])) == 2 and head_probe.modes and all(head_probe.modes)
    assert not any(torch.equal(a, b) for a,b in zip(bn_tensors(learn.model[1]), head0) if a.dtype.is_floating_point)

@pytest.mark.parametrize('fuse', [True, False])
def test_fit_one_cycle_with_weight_decay(fuse):
    "`fit_one_cycle` with weight decay on BN parameters too: still bit-identical"
    learn = conv_learner(cbs=FreezeBN(head=True, fuse=fuse), wd=0.1, wd_bn_bias=True)
    check_frozen_fit(learn, lambda: learn.fit_one_cycle(2), n_fused=2 if fuse else 0)

def test_train_bn_false_and_freeze():
    "`freeze()` with `train_bn=False`: fastai freezes the body BN, FreezeBN the head BN; flags come back as fastai set them"
    learn = conv_learner(cbs=FreezeBN(head=True), train_bn=False)
    learn.freeze()
    flags0 = flags(learn.model)
    check_frozen_fit(learn, lambda: learn.fit(1), changed=False)
    assert flags0 == [False]*8 + [True]*4   # body: 2 convs + 2 BN (weight, bias); head: BN1d + Linear

def _amp_active(learn, fit):
    "Run `fit` and return whether the model's convolutions really computed in reduced precision"
    dtypes = set()
    hook = learn.model[0][0].register_forward_hook(lambda m,i,o: dtypes.add(o.dtype))
    try: fit()
    finally: hook.remove()
    return dtypes != {torch.float32}

@pytest.mark.parametrize('to_amp', ['to_fp16', 'to_bf16'])
def test_mixed_precision(to_amp):
    learn = getattr(conv_learner(cbs=FreezeBN(head=True)), to_amp)()
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*CUDA is not available.*')
        active = _amp_active(learn, lambda: check_frozen_fit(learn, lambda: learn.fit_one_cycle(1)))
    if not active:
        pytest.skip(f"{to_amp}: fastai's MixedPrecision autocasts on 'cuda' only, so without a GPU it trains in float32 "
                    "(FreezeBN's checks passed with the callback attached, but mixed precision itself did not run)")

class CPUAutocast(Callback):
    "bfloat16 autocast on CPU, the way fastai's `MixedPrecision` autocasts on CUDA"
    order = MixedPrecision.order
    def before_batch(self): self.autocast = torch.autocast('cpu', dtype=torch.bfloat16); self.autocast.__enter__()
    def after_pred(self): self.learn.pred = self.pred.float()
    def after_loss(self): self.autocast.__exit__(None, None, None)

@pytest.mark.parametrize('fuse', [True, False])
def test_cpu_bf16_autocast(fuse):
    "Real bfloat16 mixed precision on CPU (torch's CPU autocast, since fastai's only autocasts on CUDA)"
    learn = conv_learner(cbs=[FreezeBN(head=True, fuse=fuse), CPUAutocast()])
    # `_amp_active`'s hook on the first conv keeps that pair unfused (the pair finder leaves a hooked layer): the second is fused
    assert _amp_active(learn, lambda: check_frozen_fit(learn, lambda: learn.fit_one_cycle(1), n_fused=1 if fuse else 0))

def test_gradient_accumulation():
    learn = conv_learner(cbs=[FreezeBN(head=True), GradientAccumulation(n_acc=16)])
    check_frozen_fit(learn, lambda: learn.fit(1), n_fused=2)

@pytest.mark.parametrize('fuse', [True, False])
def test_channels_last(fuse):
    learn = conv_learner(cbs=FreezeBN(head=True, fuse=fuse)).to_channelslast(use_amp=False)
    formats = []
    class Fmt(Callback):
        def after_pred(self): formats.append(self.learn.model[0][0].weight.is_contiguous(memory_format=torch.channels_last))
    check_frozen_fit(learn, lambda: learn.fit(1, cbs=Fmt()), n_fused=2 if fuse else 0)
    assert formats and all(formats)

def test_affine_false():
    learn = conv_learner(conv_bn_net(affine=False), cbs=FreezeBN(head=True))
    check_frozen_fit(learn, lambda: learn.fine_tune(1, freeze_epochs=1), n_fused=2)

def test_sync_batchnorm_model():
    "A model whose BN is `SyncBatchNorm` (single process: in eval mode it runs on CPU)"
    learn = conv_learner(nn.SyncBatchNorm.convert_sync_batchnorm(conv_bn_net()), cbs=FreezeBN(head=True))
    probe = check_frozen_fit(learn, lambda: learn.fit_one_cycle(1), n_fused=2)
    assert probe.types == {nn.SyncBatchNorm}

class ConvertSyncBN(Callback):
    "What fastai's `DistributedTrainer(sync_bn=True)` does to the model at `before_fit` (order 11), without the DDP wrap"
    order = 11
    def before_fit(self): self.learn.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)

def test_bn_converted_to_sync_bn_during_before_fit():
    "BN replaced by new `SyncBatchNorm` modules after FreezeBN's `before_fit` is still frozen"
    learn = conv_learner(cbs=[FreezeBN(head=True), ConvertSyncBN()])
    probe = check_frozen_fit(learn, lambda: learn.fit(2), n_fused=2)   # the SyncBatchNorm copies made after `before_fit`
    assert probe.types == {nn.SyncBatchNorm}

def timm_bn_act_net(bn=BatchNormAct2d):
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3,8,3,stride=2,padding=1), bn(8, drop_layer=nn.Dropout),
                      nn.Conv2d(8,8,3,stride=2,padding=1), bn(8, act_layer=nn.SiLU)),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,2)))

@pytest.mark.parametrize('fuse', [True, False])
def test_timm_batchnorm_act(fuse):
    "timm's `BatchNormAct2d`: frozen (and fused), while its dropout child keeps training"
    learn = conv_learner(timm_bn_act_net(), cbs=FreezeBN(head=True, fuse=fuse))
    drop_modes = []
    class Drop(Callback):
        def after_pred(self):
            if self.training: drop_modes.append(self.learn.model[0][1].drop.training)
    probe = check_frozen_fit(learn, lambda: learn.fit_one_cycle(1, cbs=Drop()), n_fused=2 if fuse else 0)
    assert probe.types == {BatchNormAct2d} and drop_modes and all(drop_modes)

def test_timm_sync_batchnorm_act():
    learn = conv_learner(timm_convert_sync_batchnorm(timm_bn_act_net()), cbs=FreezeBN(head=True))
    probe = check_frozen_fit(learn, lambda: learn.fit(1), n_fused=2)
    assert probe.types == {SyncBatchNormAct}

def test_timm_model_via_vision_learner():
    "A timm architecture built by `vision_learner` (its BN layers are timm's `BatchNormAct2d`)"
    learn = vision_learner(image_dls(), 'mobilenetv3_small_050', pretrained=False, n_out=2,
                           loss_func=CrossEntropyLossFlat(), cbs=FreezeBN(head=True))
    pretend_pretrained(learn.model)
    # fastai's timm body stops at `forward_features`, so the model's own `conv_head` is never used
    probe = check_frozen_fit(learn, lambda: learn.fine_tune(1, freeze_epochs=1),
                             unused=('0.model.conv_head.weight', '0.model.conv_head.bias'))
    assert BatchNormAct2d in probe.types
    assert len(fused_in(learn)) == len(freezable_bn_layers(learn.model[0]))   # every BN of the timm body, fused into its conv

def test_lr_find(tmp_path):
    "`lr_find` trains (then reloads its saved weights) with BN frozen, and ends with the flags given back"
    probe = BNProbe()
    learn = conv_learner(cbs=[FreezeBN(head=True), probe], path=tmp_path)
    flags0 = flags(learn.model)
    learn.lr_find(num_it=10, show_plot=False)
    assert len(probe.modes) >= 3*6 and not any(probe.modes)
    assert flags(learn.model) == flags0
