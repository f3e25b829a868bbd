"""Fold one small model of each family fastai and PyTorch users reach for beside torchvision and timm: MONAI,
tsai, Hugging Face transformers (built from configs, random weights) and ultralytics (built from its yaml files),
with and without a sample.

Each model gets random BN statistics (`randomize_bn`), so a wrong fold cannot hide behind identity statistics. A
fold is exact when folding a float64 copy of the model the same way gives the float64 original's outputs
(`float64_difference`, to 1e-9 of the largest output); models that do not select by value must also give the
float32 original's outputs to float32 rounding. Counts are those of each architecture, reasoned below.

Nothing is downloaded: Hugging Face and ultralytics are told they are offline, ultralytics keeps its settings in a
temporary folder, and every socket connection fails for the whole module."""
import copy, warnings
from _shared import offline_env, refuse_network
offline_env()
import pytest, torch
from torch import nn
import fastfold.fold
from fastfold.layers import bn_layers, randomize_bn, bn_flavour, is_bn
from fastfold.fold import BN_Folder, FoldCheckError, float64_difference

# folding a Hugging Face model warns about `save_pretrained` (tested below); elsewhere that warning is expected
pytestmark = pytest.mark.filterwarnings('ignore:.*is a Hugging Face `PreTrainedModel`')

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    refuse_network(monkeypatch)
    torch.manual_seed(0)

def inputs(*shape): return torch.randn(*shape, generator=torch.Generator().manual_seed(0))

def check(model, x, n_bn, n_folded, sample, selects=False, at_least=False):
    "Fold `model` (random BN statistics); check the counts, that `model` is untouched, and that the fold is exact"
    model = randomize_bn(model).eval()
    args = x if isinstance(x, tuple) else (x,)
    sd = copy.deepcopy(model.state_dict())
    folder = BN_Folder()
    folded = folder.fold(model, sample=x if sample else None)
    r = folder.report
    assert len(bn_layers(model)) == n_bn == r.n_bn, r
    assert (len(r.folded) >= n_folded) if at_least else (len(r.folded) == n_folded), r
    assert len(bn_layers(folded)) == len(r.left)
    assert all(torch.equal(v, model.state_dict()[k]) for k,v in sd.items())
    diff,scale,_ = float64_difference(model, r.folded, args)
    assert diff <= 1e-9*scale, f'float64 fold differs by {diff:.3g} (largest output {scale:.3g})'
    if not selects:
        with torch.inference_mode(): d,s = fastfold.fold.output_difference(model(*args), folded(*args))
        assert d <= 1e-4*s, f'float32 fold differs by {d:.3g} (largest output {s:.3g})'
    return folded, r

def check_needs_sample(model, x, n_bn, sample, **kw):
    """A model whose `forward` fx cannot trace and whose code passes its modules on (ultralytics' `_predict_once` hands
    each layer to its profiler; DETR's calls its inner model with `**kwargs`): with a sample every BN folds; without
    one none does, each left with a reason that says a sample settles it"""
    _,r = check(model, x, n_bn, n_bn if sample else 0, sample, **kw)
    if not sample: assert all('fold with a sample' in l.reason for l in r.left), r
    return r

# ---- MONAI
@pytest.mark.parametrize('sample', [False, True])
def test_monai_basicunet(sample):
    from monai.networks.nets import BasicUNet
    m = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4), norm='batch')
    check(m, inputs(2, 1, 32, 32), 18, 18, sample) # every BN right after its conv

@pytest.mark.parametrize('sample', [False, True])
def test_monai_densenet(sample):
    from monai.networks.nets import DenseNet
    m = DenseNet(spatial_dims=2, in_channels=1, out_channels=3, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2)
    # pre-activation dense layers: `norm2` follows `conv1` and folds, as does the stem's `norm0`; each layer's `norm1`,
    # the transition's and the final norm read a `cat` of earlier features or a pool, and are left
    _,r = check(m, inputs(2, 1, 32, 32), 11, 5, sample)
    assert all('cat' in l.reason or 'Pool2d' in l.reason for l in r.left), r

# ---- tsai
@pytest.mark.parametrize('sample', [False, True])
def test_tsai_resnet(sample):
    from tsai.models.ResNet import ResNet
    # 3 blocks x 3 ConvBlocks, and the shortcut ConvBlocks of the two blocks that change width; the last block's
    # shortcut is a bare BN on the block's input (a ReLU's output), left
    _,r = check(ResNet(3, 2), inputs(4, 3, 32), 12, 11, sample)
    assert r.left[0].reason.startswith('its input comes from `resblock2.act` (ReLU)'), r

@pytest.mark.parametrize('sample', [False, True])
def test_tsai_inceptiontime_fcn(sample):
    from tsai.models.InceptionTime import InceptionTime
    from tsai.models.FCN import FCN
    # each inception module's BN follows the `cat` of its convs; the residual shortcut's BN reads a ReLU's output
    check(InceptionTime(3, 2, nf=8), inputs(4, 3, 32), 8, 7, sample)
    check(FCN(3, 2, layers=[8, 16, 8]), inputs(4, 3, 32), 3, 3, sample)

# ---- Hugging Face transformers, from configs
SMALL_DETR = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, num_labels=3)

def small_resnet_config(**kw):
    from transformers import ResNetConfig
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, **kw)

@pytest.mark.parametrize('sample', [False, True])
def test_hf_resnet(sample):
    from transformers import ResNetForImageClassification
    check(ResNetForImageClassification(small_resnet_config()), inputs(2, 3, 32, 32), 8, 8, sample)

@pytest.mark.parametrize('sample', [False, True])
def test_hf_mobilenet_v2(sample):
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    # its BN sit inside `forward`s fx cannot trace (TF 'same' padding): a sample run reads them, and all fold
    check(MobileNetV2ForImageClassification(MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=3)),
          inputs(2, 3, 32, 32), 52, 52 if sample else 0, sample, at_least=not sample)

@pytest.mark.parametrize('sample', [False, True])
def test_hf_detr_frozen_bn(sample):
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig
    from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], out_features=['stage4'])
    m = DetrForObjectDetection(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, **SMALL_DETR))
    assert {type(b) for _,b in bn_layers(m)} == {DetrFrozenBatchNorm2d} # each after its conv
    check_needs_sample(m, inputs(1, 3, 64, 64), 16, sample)

def rt_detr_config(cls, **kw):
    from transformers import RTDetrResNetConfig
    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 1], out_features=['stage2', 'stage3', 'stage4'])
    return cls(backbone_config=backbone, encoder_in_channels=[16, 32, 32], decoder_in_channels=[32, 32, 32], encoder_hidden_dim=32,
               d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
               decoder_n_points=2, num_labels=3, **({'decoder_layers': 1, 'num_queries': 20} | kw))

@pytest.mark.parametrize('sample', [False, True])
def test_hf_rt_detr_frozen_bn(sample):
    from transformers import RTDetrConfig, RTDetrForObjectDetection
    m = RTDetrForObjectDetection(rt_detr_config(RTDetrConfig))
    assert {type(b).__name__ for _,b in bn_layers(m)} == {'BatchNorm2d', 'RTDetrFrozenBatchNorm2d'}
    check_needs_sample(m, inputs(1, 3, 64, 64), 61, sample, selects=True) # its queries are the top-k of the encoder's scores

def test_hf_rt_detr_v2_exact_fold_passes_the_check():
    "The issue's false alarm: 300 queries chosen by `topk`; float32 rounding may pick others, the float64 fold is exact"
    from transformers import RTDetrV2Config, RTDetrV2ForObjectDetection
    m = RTDetrV2ForObjectDetection(rt_detr_config(RTDetrV2Config, decoder_layers=2, num_queries=300))
    _,r = check(m, inputs(2, 3, 128, 128), 61, 61, True, selects=True)
    if r.max_abs_diff > r.tolerance: assert r.f64_diff <= r.f64_tolerance and '`topk`' in r.cause, r

class FrozenBNReLU(nn.Module):
    "Buffers and name of a frozen BN, with a ReLU inside its `forward`: not a BN"
    def __init__(self, n):
        super().__init__()
        for k,v in dict(weight=torch.ones(n), bias=torch.zeros(n), running_mean=torch.zeros(n), running_var=torch.ones(n)).items(): self.register_buffer(k, v)
    def forward(self, x):
        scale = self.weight.view(1, -1, 1, 1) * (self.running_var.view(1, -1, 1, 1) + 1e-5).rsqrt()
        return (x*scale + self.bias.view(1, -1, 1, 1) - self.running_mean.view(1, -1, 1, 1)*scale).relu()

@pytest.mark.parametrize('sample', [False, True])
def test_frozen_bn_lookalike_is_left(sample):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBNReLU(4))
    assert is_bn(m[1]) # shaped like a BN, so it is listed, and left with the reason
    _,r = check(m, inputs(2, 3, 9, 9), 1, 0, sample)
    assert 'computes more than a per-channel affine map of its buffers' in r.left[0].reason, r

def test_frozen_bn_with_a_hook_is_left():
    from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d
    m = nn.Sequential(nn.Conv2d(3, 4, 3), DetrFrozenBatchNorm2d(4))
    m[1].register_forward_hook(lambda mod, args, out: out.relu())
    _,r = check(m, inputs(2, 3, 9, 9), 1, 0, True)
    assert r.left[0].reason == 'it has hooks', r

# ---- ultralytics, from its yaml files
@pytest.mark.parametrize('sample', [False, True])
@pytest.mark.parametrize('cfg,n_bn', [('yolov8n.yaml', 57), ('yolo11n.yaml', 81)])
def test_ultralytics_yolo(cfg, n_bn, sample):
    from ultralytics.nn.tasks import DetectionModel
    check_needs_sample(DetectionModel(cfg, verbose=False), inputs(1, 3, 64, 64), n_bn, sample) # every BN in a `Conv` block, after its conv

def rtdetr_l():
    from ultralytics.nn.tasks import RTDETRDetectionModel
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return RTDETRDetectionModel('rtdetr-l.yaml', verbose=False)

def test_ultralytics_rtdetr_l_without_sample():
    check_needs_sample(rtdetr_l(), inputs(1, 3, 64, 64), 122, False, selects=True)

def test_ultralytics_rtdetr_l_exact_fold_passes_the_check():
    "The issue's false alarm: at 160 pixels float32 rounding tips its `topk` of queries; the float64 fold is exact"
    _,r = check(rtdetr_l(), inputs(1, 3, 160, 160), 122, 122, True, selects=True)
    assert r.max_abs_diff > r.tolerance and r.f64_diff <= r.f64_tolerance, r # the float64 check ran, and passed
    assert '`topk`' in r.cause and 'in float64' in str(r)

# ---- a wrong fold still raises
class Pick(nn.Module):
    "Which of two channels, equal up to rounding, scores higher: float32 rounding tips some picks"
    def __init__(self):
        super().__init__(); self.conv,self.bn = nn.Conv2d(3, 2, 1),nn.BatchNorm2d(2)
    def forward(self, x): return self.bn(self.conv(x)).mean((2, 3)).argmax(1)

def near_tie():
    m = randomize_bn(Pick()).eval()
    with torch.no_grad():
        m.conv.weight[1],m.conv.bias[1] = 3*m.conv.weight[0],3*m.conv.bias[0]
        bn = m.bn; bn.running_mean[1],bn.running_var[1] = 3*bn.running_mean[0],9*bn.running_var[0]+8*bn.eps
        bn.weight[1],bn.bias[1] = bn.weight[0],bn.bias[0]
    return m

def test_float32_noise_is_not_an_error():
    m,x = near_tie(),inputs(64, 3, 4, 4)
    folder = BN_Folder()
    folded = folder.fold(m, sample=x)
    r = folder.report
    assert (folded(x) != m(x)).any() and r.max_abs_diff > r.tolerance and r.f64_diff <= r.f64_tolerance, r
    assert r.cause == 'a selection by value (`argmax`) that rounding can tip'

def wrong_fold(monkeypatch):
    "Fold every BN with a scale 1% off: a wrong fold, in float32 and in float64"
    right = fastfold.fold.bn_scale_shift
    monkeypatch.setattr(fastfold.fold, 'bn_scale_shift', lambda *a: (right(*a)[0]*1.01, right(*a)[1]))

@pytest.mark.parametrize('inplace', [False, True])
def test_wrong_fold_raises(monkeypatch, inplace):
    wrong_fold(monkeypatch)
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    sd = copy.deepcopy(m.state_dict())
    with pytest.raises(FoldCheckError, match='and in float64 by'): BN_Folder().fold(m, sample=inputs(2, 3, 9, 9), inplace=inplace)
    assert type(m[1]) is nn.BatchNorm2d and all(torch.equal(v, m.state_dict()[k]) for k,v in sd.items()) # undone

def test_float64_check_that_cannot_run_is_an_error(monkeypatch):
    class Float32Only(nn.Module): # casts to float32 whatever it gets: the float64 copy cannot run
        def __init__(self): super().__init__(); self.net = near_tie()
        def forward(self, x): return self.net(x.float())
    m = Float32Only()
    with pytest.raises(FoldCheckError, match='the float64 check could not run'): BN_Folder().fold(m, sample=inputs(64, 3, 4, 4))

def test_inplace_fold_kept_when_float64_passes():
    m,x = near_tie(),inputs(64, 3, 4, 4)
    out = BN_Folder().fold(m, sample=x, inplace=True)
    assert out is m and type(m.bn) is nn.Identity and m.conv.bias is not None

# ---- Hugging Face's own save and load
def test_hf_save_pretrained_warns_and_what_works(tmp_path):
    from transformers import ResNetForImageClassification
    m = randomize_bn(ResNetForImageClassification(small_resnet_config())).eval()
    x = inputs(2, 3, 32, 32)
    with torch.inference_mode(): y = m(x).logits
    with pytest.warns(UserWarning, match='save_pretrained.*torch.save'): folded = BN_Folder().fold(m)
    with torch.inference_mode(): torch.testing.assert_close(folded(x).logits, y, rtol=1e-4, atol=1e-5)
    # what the warning says: `save_pretrained` -> `from_pretrained` is silently wrong...
    folded.save_pretrained(tmp_path/'hf')
    back = ResNetForImageClassification.from_pretrained(tmp_path/'hf').eval()
    with torch.inference_mode(): yb = back(x).logits
    assert (yb - y).abs().max() > 1e-2*y.abs().max()
    # ...and what works: the whole module with `torch.save`, or folding after `from_pretrained`
    torch.save(folded, tmp_path/'folded.pt')
    with torch.inference_mode(): torch.testing.assert_close(torch.load(tmp_path/'folded.pt', weights_only=False)(x).logits, y, rtol=1e-4, atol=1e-5)
    m.save_pretrained(tmp_path/'unfolded')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        refolded = BN_Folder().fold(ResNetForImageClassification.from_pretrained(tmp_path/'unfolded'))
    with torch.inference_mode(): torch.testing.assert_close(refolded(x).logits, y, rtol=1e-4, atol=1e-5)

def test_no_warning_for_other_models():
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        BN_Folder().fold(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
