"""Re-parameterisable families (issue 29): one architecture per family folds to no BatchNorm, its parallel branches
merged, with exact outputs and no more convolutions than the library's own deploy form; the folded model pickles,
loads with fastai where fastfold cannot be imported, and passes fastfold's checked loader.

Models have random weights and random BN statistics (`randomize_bn`), small inputs. A fold is exact when it gives
the original's outputs to 1e-5 of the largest output; a model that selects by value (rtdetr-l's `topk` of queries,
which float32 rounding can tip) may instead show that a float64 copy folded the same way gives the float64
original's outputs to 1e-9 of the largest output. Convolutions are counted as the issue does: `_ConvNd` modules.
The deploy forms are computed here, from the installed libraries, never written down.

Nothing is downloaded: Hugging Face and ultralytics are told they are offline, ultralytics keeps its settings in a
temporary folder, and every socket connection fails for the whole module."""
import copy, inspect, io, json, subprocess, sys, warnings
from _shared import offline_env, refuse_network, NO_FASTFOLD_PRELUDE
offline_env()
import pytest, torch
from torch import nn
from fastfold.layers import bn_layers, randomize_bn
from fastfold.fold import BN_Folder, output_difference
from fastfold.export import check_export_file

pytestmark = pytest.mark.filterwarnings('ignore:.*is a Hugging Face `PreTrainedModel`')

@pytest.fixture(autouse=True)
def offline(monkeypatch): refuse_network(monkeypatch)

def n_convs(m:nn.Module) -> int: return sum(isinstance(c, nn.modules.conv._ConvNd) for c in m.modules())

def one_conv_per(model:nn.Module, block:str) -> int:
    "Conv layers of `model` once every module of class `block` is a single conv"
    return n_convs(model) - sum(n_convs(m) - 1 for m in model.modules() if type(m).__name__ == block)

# ---- the families: how each is built, its input, and its deploy form
def timm_model(name):
    import timm
    return timm.create_model(name, pretrained=False, num_classes=10)

def timm_deploy(model):
    "timm's own deploy form of `model` (on a copy): its conv layers and the BN it leaves"
    from timm.utils.model import reparameterize_model
    d = reparameterize_model(copy.deepcopy(model))
    return n_convs(d), len(bn_layers(d))

def ultralytics_model(cfg):
    from ultralytics.nn.tasks import DetectionModel, RTDETRDetectionModel
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return (RTDETRDetectionModel if cfg.startswith('rtdetr') else DetectionModel)(cfg, verbose=False)

def textnet():
    from transformers import TextNetConfig, TextNetModel
    return TextNetModel(TextNetConfig())

def pp_lcnet_v3():
    from transformers import PPLCNetV3Backbone, PPLCNetV3Config
    return PPLCNetV3Backbone(PPLCNetV3Config())

TIMM = ['repvgg_a0', 'mobileone_s0', 'fastvit_t8', 'repghostnet_050', 'repvit_m0_9', 'nextvit_small', 'ghostnetv3_050']
# name -> (builder, what the model's library counts as its deploy form's conv layers: a function of the model)
FAMILIES = {**{n: ((lambda n=n: timm_model(n)), lambda m: timm_deploy(m)[0]) for n in TIMM},
            'rtdetr-l': (lambda: ultralytics_model('rtdetr-l.yaml'), lambda m: one_conv_per(m, 'RepConv')),
            'yolov10n': (lambda: ultralytics_model('yolov10n.yaml'), lambda m: one_conv_per(m, 'RepVGGDW')),
            'textnet': (textnet, lambda m: one_conv_per(m, 'TextNetRepConvLayer')),
            'pp_lcnet_v3': (pp_lcnet_v3, lambda m: one_conv_per(m, 'PPLCNetV3LearnableRepLayer'))}
SELECTS = {'rtdetr-l'}
NEEDS_SAMPLE = {'rtdetr-l', 'yolov10n', 'pp_lcnet_v3'} # fx cannot trace them: a run on the sample shows their data flow # picks its queries by `topk` of scores: float32 rounding may tip a pick, float64 may not
LIBRARY = {'rtdetr-l': 'ultralytics', 'yolov10n': 'ultralytics', 'textnet': 'transformers', 'pp_lcnet_v3': 'transformers'}

def sample(): return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

_folds = {}
def folded(name):
    "`(model, folded, report, x)` of family `name`, folded once per test session"
    if name not in _folds:
        torch.manual_seed(0)
        model,x = randomize_bn(FAMILIES[name][0]()).eval(),sample()
        sd = copy.deepcopy(model.state_dict())
        folder = BN_Folder() # the others are folded as fx reads them, and checked below
        out = folder.fold(model, sample=x if name in NEEDS_SAMPLE else None)
        after = model.state_dict()
        assert sd.keys() == after.keys() and all(torch.equal(v, after[k]) for k,v in sd.items()), 'the input model was changed'
        _folds[name] = model,out,folder.report,x
    return _folds[name]

def float64_error(model, name, x) -> tuple[float,float]:
    "A float64 copy of `model` folded as fastfold does, against that copy unfolded: `(max |difference|, largest |output|)`"
    m64 = copy.deepcopy(model).double()
    with torch.inference_mode(): want = m64(x.double())
    return output_difference(want, BN_Folder().fold(m64, sample=x.double())(x.double()))

@pytest.mark.parametrize('name', FAMILIES)
def test_family_folds_every_bn(name):
    assert len(bn_layers(folded(name)[1])) == 0, folded(name)[2]

@pytest.mark.parametrize('name', FAMILIES)
def test_family_fold_is_exact(name):
    model,out,r,x = folded(name)
    assert type(out) is type(model)
    with torch.inference_mode(): d,s = output_difference(model(x), out(x))
    if d <= 1e-5*s: return
    assert name in SELECTS, f'float32 fold differs by {d:.3g} (largest output {s:.3g})'
    diff,scale = float64_error(model, name, x)
    assert diff <= 1e-9*scale, f'float32 fold differs by {d:.3g}, float64 fold by {diff:.3g} (largest output {scale:.3g})'

@pytest.mark.parametrize('name', FAMILIES)
def test_family_no_more_convs_than_deploy_form(name):
    model,out,r,_ = folded(name)
    assert n_convs(out) <= FAMILIES[name][1](model), r
    # each merge the report lists takes out all its convs but the one it goes into, and nothing else does
    assert n_convs(model) - n_convs(out) == sum(sum(k == 'conv' for k,_ in m.branches) - 1 for m in r.merged), r

def test_rtdetr_l_no_more_convs_than_ultralytics_fuse():
    "`fuse()` merges each `RepConv`: 12 of them in rtdetr-l; fastfold ends with no more convs"
    model,out,r,_ = folded('rtdetr-l')
    fused = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        fused.fuse(verbose=False)
    assert n_convs(out) <= n_convs(fused) < n_convs(model), r

@pytest.mark.parametrize('name', TIMM)
def test_fewer_bn_than_timm_deploy_form(name):
    "Where timm's own deploy form leaves BN (FastViT, RepGhost, NextViT, GhostNetV3), fastfold leaves fewer"
    model,out,r,_ = folded(name)
    left = timm_deploy(model)[1]
    assert len(bn_layers(out)) < left or left == len(bn_layers(out)) == 0, r

# ---- the folded models leave fastfold behind: pickled in a fastai Learner, loaded by fastai alone and by the checked loader
NO_FASTFOLD = NO_FASTFOLD_PRELUDE + r'''
FLAT
out = {}
for fname in sys.argv[1:]:
    learn,(x,want) = load_learner(fname + '.pkl'),torch.load(fname + '.pt')
    with torch.inference_mode(): got = flat(learn.model(x))
    out[fname] = dict(diff=max((a - b).abs().max().item() for a,b in zip(got, want, strict=True)),
                      bn=sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in learn.model.modules()))
out['fastfold'] = [m for m in sys.modules if m.split('.')[0] == 'fastfold']
print(json.dumps(out))
'''

def flat(o) -> list:
    "The tensors of a model's output, in order (a Hugging Face output is a dict)"
    if isinstance(o, torch.Tensor): return [o]
    if isinstance(o, dict): o = list(o.values())
    return [t for v in o for t in flat(v)] if isinstance(o, (list, tuple)) else []
NO_FASTFOLD = NO_FASTFOLD.replace('FLAT', inspect.getsource(flat))

def export(model, fname):
    "A fastai Learner around `model`, exported to `fname` as `learn.export` does"
    from fastai.data.core import Datasets
    from fastai.learner import Learner
    from fastcore.basics import noop
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        Learner(Datasets(range(4), [[noop], [noop]]).dataloaders(bs=2), model, loss_func=nn.MSELoss()).export(fname)

UNPICKLABLE = {'pp_lcnet_v3'} # Hugging Face's own model holds a local function (its output-capturing hook): see below

def test_pp_lcnet_v3_itself_does_not_pickle():
    "Why PP-LCNetV3 is not pickled below: the model as Hugging Face builds it cannot be, folded or not"
    with pytest.raises(AttributeError, match="Can't pickle local object"): torch.save(pp_lcnet_v3(), io.BytesIO())

def test_folded_families_load_without_fastfold(tmp_path):
    names,want = [n for n in FAMILIES if n not in UNPICKLABLE],{}
    for n in names:
        _,out,_,x = folded(n)
        export(out, tmp_path/f'{n}.pkl')
        check_export_file(tmp_path/f'{n}.pkl', modules=[LIBRARY[n]] if n in LIBRARY else ()) # fastfold's checked loader
        with torch.inference_mode(): y = out(x)
        torch.save((x, flat(y)), tmp_path/f'{n}.pt')
        want[n] = output_difference(y, y)[1],len(bn_layers(out))
    res = subprocess.run([sys.executable, '-c', NO_FASTFOLD, *(str(tmp_path/n) for n in names)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got.pop('fastfold') == []
    for n in names: # the very model that was saved, BN and all
        scale,bn = want[n]
        assert got[str(tmp_path/n)]['diff'] <= 1e-6*scale and got[str(tmp_path/n)]['bn'] == bn, (n, got[str(tmp_path/n)])
