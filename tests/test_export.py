"""Tests of `fastfold.export` on real images: `learn.export` with `FoldOnExport`, `learn.fold()`, and the
`fastfold-fold` command, on a fastai `vision_learner(dls, resnet18)` over 64 Oxford-IIIT Pet images."""
import json, os, re, subprocess, sys, threading, warnings
from pathlib import Path
import pytest, torch
from torch import nn, Tensor
from fastcore.test import test_close as assert_close
import numpy as np
from fastai.data.block import DataBlock, CategoryBlock
from fastai.data.transforms import get_image_files, parent_label, RandomSplitter
from fastai.data.external import untar_data, URLs
from fastai.learner import Learner, load_learner
from fastai.vision.all import ImageBlock, Resize, vision_learner, resnet18
from fastfold.layers import bn_layers
from fastfold.fold import n_params, FoldReport, FoldCheckError
from fastfold.freeze import FreezeBN
from fastfold.export import *
from fastfold.export import _fastai_export
from _shared import NO_FASTFOLD_PRELUDE

pytestmark = pytest.mark.slow # trains on real images and starts several processes
N_PER_CLASS = 32
CLI = Path(sys.executable).parent/'fastfold-fold'
EPS = 1e-4 # on probabilities; the fold itself changes the outputs by about 1e-6

# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope='module')
def pets(tmp_path_factory):
    "32 cat and 32 dog images (Pets file names: cats are capitalised) linked into `cat/` and `dog/`, for `parent_label`"
    src = sorted((untar_data(URLs.PETS)/'images').glob('*.jpg'))
    cats,dogs = [f for f in src if f.name[0].isupper()],[f for f in src if f.name[0].islower()]
    assert len(cats) >= N_PER_CLASS and len(dogs) >= N_PER_CLASS, f'too few Pets images: {len(src)}'
    d = tmp_path_factory.mktemp('pets')
    for cls,fs in (('cat', cats[:N_PER_CLASS]), ('dog', dogs[:N_PER_CLASS])):
        (d/cls).mkdir()
        for f in fs: (d/cls/f.name).symlink_to(f)
    print(f'tests/test_export.py: {2*N_PER_CLASS} of the {len(src)} Pets images')
    return d

@pytest.fixture(scope='module')
def dls(pets):
    return DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                     splitter=RandomSplitter(0.25, seed=42), item_tfms=Resize(64)).dataloaders(pets, bs=16, num_workers=0)

@pytest.fixture(scope='module')
def weights(dls):
    "resnet18 weights whose BatchNorm is far from the identity: random gamma/beta, running statistics of the images"
    torch.manual_seed(0)
    model = vision_learner(dls, resnet18, pretrained=False).model
    bns = [bn for _,bn in bn_layers(model)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5); bn.bias.normal_(0, 0.2)
            bn.reset_running_stats(); bn.momentum = None # cumulative average: the exact statistics of the batches
        model.train()
        for xb,_ in dls.train: model(xb)
    for bn in bns: bn.momentum = 0.1
    return {k: v.clone() for k,v in model.state_dict().items()}

@pytest.fixture
def make_learner(dls, weights, tmp_path):
    def _make(cbs=None):
        learn = vision_learner(dls, resnet18, pretrained=False, path=tmp_path, cbs=cbs)
        learn.model.load_state_dict(weights)
        return learn
    return _make

@pytest.fixture
def images(pets): return sorted(pets.rglob('*.jpg'))[::8] # 8 images, both classes

@pytest.fixture(scope='module')
def n_bn(dls): return len(bn_layers(vision_learner(dls, resnet18, pretrained=False).model))

# ---------------------------------------------------------------------------------------------------- helpers
def one_step(learn):
    "Give `learn` an optimizer with state: one real Adam step on one batch, body frozen as in `fine_tune`"
    learn.freeze()
    xb,yb = learn.dls.train.one_batch()
    learn.model.train()
    learn.loss_func(learn.model(xb), yb).backward()
    learn.opt.step(); learn.opt.zero_grad()
    assert len(learn.opt.state) > 0

def snapshot(learn):
    "What must not change in a live learner: its objects, and the values of its model and optimizer state"
    return dict(model=learn.model, dls=learn.dls, opt=learn.opt, cbs=list(learn.cbs), attrs=dict(learn.__dict__),
                modules=list(learn.model.modules()), sd={k: v.clone() for k,v in learn.model.state_dict().items()},
                training=[m.training for m in learn.model.modules()], opt_state=_opt_state(learn.opt))

def _opt_state(opt):
    if opt is None: return None
    return [{k: v.clone() if isinstance(v, Tensor) else v for k,v in opt.state.get(p, {}).items()}
            for p in opt.all_params(with_grad=False).itemgot(0)]

def _same(a, b): return torch.equal(a, b) if isinstance(a, Tensor) else a == b

def assert_same_learner(learn, s):
    for k in ('model', 'dls', 'opt'): assert getattr(learn, k) is s[k], k
    assert len(learn.cbs) == len(s['cbs']) and all(a is b for a,b in zip(learn.cbs, s['cbs']))
    assert learn.__dict__.keys() == s['attrs'].keys()
    assert all(learn.__dict__[k] is v for k,v in s['attrs'].items())
    assert all(a is b for a,b in zip(learn.model.modules(), s['modules'])) and len(list(learn.model.modules())) == len(s['modules'])
    sd = learn.model.state_dict()
    assert sd.keys() == s['sd'].keys()
    assert all(torch.equal(sd[k], v) or (sd[k].isnan() == v.isnan()).all() for k,v in s['sd'].items())
    assert [m.training for m in learn.model.modules()] == s['training']
    new = _opt_state(learn.opt)
    assert len(new) == len(s['opt_state']) and any(s['opt_state'])
    for a,b in zip(new, s['opt_state']): assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)

def load(fname):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return load_learner(fname)

def preds(learn, images):
    with learn.no_bar(): return learn.get_preds(dl=learn.dls.test_dl(images))[0]

def predict(learn, image):
    with learn.no_bar(): return learn.predict(image)

def temp_files(d): return [p.name for p in Path(d).rglob('*.tmp')]

NO_FASTFOLD = NO_FASTFOLD_PRELUDE + r'''
fname,control,files = sys.argv[1],sys.argv[2],sys.argv[3:]
try: load_learner(control); control_error = None
except Exception as e: control_error = f'{type(e).__name__}: {e}'
learn = load_learner(fname)
pred = learn.predict(files[0])
print(json.dumps(dict(probs=learn.get_preds(dl=learn.dls.test_dl(files))[0].tolist(), label=str(pred[0]),
                      predict=pred[2].tolist(), cbs=[type(cb).__name__ for cb in learn.cbs], control_error=control_error,
                      n_bn=sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in learn.model.modules()),
                      fastfold=[m for m in sys.modules if m.split('.')[0] == 'fastfold'])))
'''

def run_cli(*args):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300)

# ---------------------------------------------------------------------------------------------------- FoldOnExport
def test_export_loads_without_fastfold_and_predicts_the_same(make_learner, images, n_bn, tmp_path):
    "The folded export loads with fastai alone (fastfold made unimportable) and predicts what the live learner does"
    learn = make_learner(cbs=[FoldOnExport(), FreezeBN()])
    learn.export('folded.pkl')
    rep = learn.fold_on_export.report
    assert len(rep.folded) == n_bn and rep.left == []
    assert rep.max_abs_diff is not None and 0 < rep.max_abs_diff <= rep.tolerance # checked on a real batch of the dls
    # control: fastai's own export of the same learner pickles the FreezeBN callback, so it needs fastfold to load
    learn.remove_cb(learn.fold_on_export)
    learn.export('control.pkl')
    res = subprocess.run([sys.executable, '-c', NO_FASTFOLD, str(tmp_path/'folded.pkl'), str(tmp_path/'control.pkl'),
                          *map(str, images)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out['fastfold'] == []
    assert out['control_error'], 'a file that needs fastfold loaded: the import blocker does not work'
    assert out['n_bn'] == 0
    assert out['cbs'] == [type(cb).__name__ for cb in learn.cbs if not isinstance(cb, FreezeBN)]
    assert_close(torch.tensor(out['probs']), preds(learn, images), eps=EPS)
    label,_,probs = predict(learn, images[0])
    assert out['label'] == label
    assert_close(torch.tensor(out['predict']), probs, eps=EPS)
    sizes = [(tmp_path/f).stat().st_size for f in ('control.pkl', 'folded.pkl')]
    print(f'{rep}\nfastai export {sizes[0]:,} bytes, folded export {sizes[1]:,} bytes')
    assert sizes[1] < sizes[0]

def test_prediction_parity(make_learner, images, tmp_path):
    "`predict` on a real image and `get_preds` on a test DataLoader: the loaded folded learner matches the live one"
    learn = make_learner(cbs=FoldOnExport())
    learn.export('folded.pkl')
    folded = load(tmp_path/'folded.pkl')
    assert len(bn_layers(folded.model)) == 0 and n_params(folded.model) < n_params(learn.model)
    p0,p1 = preds(learn, images),preds(folded, images)
    assert_close(p1, p0, eps=EPS)
    assert (p0.argmax(1) == p1.argmax(1)).all()
    for img in images[:3]:
        a,b = predict(learn, img),predict(folded, img)
        assert a[0] == b[0] and a[1] == b[1]
        assert_close(b[2], a[2], eps=EPS)

def test_live_learner_intact_and_trains_again(make_learner, n_bn, tmp_path):
    "After the export the live learner is the same object for object, and fits on with its BatchNorm and optimizer"
    learn = make_learner(cbs=FoldOnExport())
    one_step(learn)
    s = snapshot(learn)
    learn.export('folded.pkl')
    assert_same_learner(learn, s)
    head_w,bns = learn.model[1][-1].weight.detach().clone(),bn_layers(learn.model)
    head_bn = learn.model[1][2].running_mean.clone()
    with learn.no_bar(): learn.fit(1, 1e-3)
    assert learn.opt is s['opt'] and len(learn.recorder.values) == 1 # the same optimizer, with its state
    assert all(map(np.isfinite, learn.recorder.values[-1]))
    assert len(bn_layers(learn.model)) == n_bn and all(a[1] is b[1] for a,b in zip(bn_layers(learn.model), bns))
    assert not torch.equal(learn.model[1][-1].weight, head_w)  # it trained
    assert not torch.equal(learn.model[1][2].running_mean, head_bn) # with live BatchNorm
    learn.export('folded.pkl')                                     # and exports again
    assert len(bn_layers(load(tmp_path/'folded.pkl').model)) == 0

def _unpicklable(learn): learn.lock_copy = threading.Lock()
def _nested_fastfold(learn): learn.history = [FoldReport()]
def _nan_bn(learn): bn_layers(learn.model)[5][1].running_mean[0] = float('nan')
def _zero_tolerance(learn): learn.fold_on_export.rtol = 0.

@pytest.mark.parametrize('break_it,fname,what,why', [
    (_unpicklable, 'export.pkl', 'writing the file', "cannot pickle '_thread.lock'"),
    (_nested_fastfold, 'export.pkl', 'writing the file', 'would need fastfold to load'),
    (_nan_bn, 'export.pkl', 'folding the model', 'non-finite running_mean'),
    (_zero_tolerance, 'export.pkl', 'folding the model', 'FoldCheckError'),
    (None, 'missing/export.pkl', 'writing the file', 'No such file')],
    ids=['unpicklable', 'fastfold-inside', 'nan-bn', 'check-fails', 'missing-folder'])
def test_failing_export_writes_nothing_and_keeps_the_learner(make_learner, tmp_path, break_it, fname, what, why):
    "A failing export leaves the file that was there, no temporary file, and the learner exactly as it was"
    learn = make_learner(cbs=FoldOnExport())
    one_step(learn)
    if break_it: break_it(learn)
    (tmp_path/'export.pkl').write_bytes(b'the previous export')
    s = snapshot(learn)
    with pytest.raises(FoldExportError) as e: learn.export(fname)
    msg = str(e.value)
    assert what in msg and why in msg and 'Nothing was written' in msg, msg
    assert e.value.__cause__ is not None
    assert (tmp_path/'export.pkl').read_bytes() == b'the previous export'
    assert not (tmp_path/'missing').exists() and temp_files(tmp_path) == []
    assert_same_learner(learn, s)

def test_fastai_export_unchanged_without_foldonexport(make_learner, n_bn, tmp_path):
    "Without a `FoldOnExport`, `learn.export` is fastai's own: the model is exported with its BatchNorm"
    assert _fastai_export.__module__ == 'fastai.learner' and Learner.export._fastfold_prev is _fastai_export
    learn = make_learner()
    learn.export('plain.pkl')
    assert len(bn_layers(load(tmp_path/'plain.pkl').model)) == n_bn

def test_nonzero_rank_writes_nothing(make_learner, tmp_path, monkeypatch):
    learn = make_learner(cbs=FoldOnExport())
    monkeypatch.setenv('RANK', '1')
    learn.export('folded.pkl')
    assert not (tmp_path/'folded.pkl').exists() and learn.fold_on_export.report is None
    monkeypatch.setenv('RANK', '0')
    learn.export('folded.pkl')
    assert (tmp_path/'folded.pkl').exists()

# ---------------------------------------------------------------------------------------------------- learn.fold()
def test_learn_fold(make_learner, images, n_bn, tmp_path):
    "`learn.fold()` folds the model in place for inference: same predictions, no BN, eval mode, optimizer dropped"
    learn = make_learner()
    one_step(learn)
    model,p0 = learn.model,preds(learn, images)
    rep = learn.fold()
    assert learn.model is model and learn.fold_report is rep and 'fold_report' not in learn.__dict__
    assert len(rep.folded) == n_bn and len(bn_layers(model)) == 0 and rep.params_after < rep.params_before
    assert rep.max_abs_diff is not None and rep.max_abs_diff <= rep.tolerance
    assert not any(m.training for m in model.modules()) and learn.opt is None
    assert_close(preds(learn, images), p0, eps=EPS)
    learn.export('folded_plain.pkl')                    # fastai's own export of a folded learner: no fastfold inside
    check_export_file(tmp_path/'folded_plain.pkl')

@pytest.mark.parametrize('case', ['nan-bn', 'check-fails'])
def test_learn_fold_failure_changes_nothing(make_learner, case):
    "A fold that fails (corrupted statistics, or a check that fails) leaves the learner as it was, train mode included"
    learn = make_learner()
    one_step(learn)
    if case == 'nan-bn': _nan_bn(learn)
    s = snapshot(learn)
    exc,msg,kw = (ValueError, 'non-finite running_mean', {}) if case == 'nan-bn' else (FoldCheckError, 'differs', dict(rtol=0.))
    with pytest.raises(exc, match=msg): learn.fold(**kw)
    assert_same_learner(learn, s)
    assert learn.fold_report is None

# ---------------------------------------------------------------------------------------------------- the command
@pytest.fixture
def plain_export(make_learner, tmp_path):
    "A learner exported with fastai's own `export` (unfolded), and the learner"
    learn = make_learner()
    learn.export('export.pkl')
    return tmp_path/'export.pkl',learn

def test_cli_folds_an_export(plain_export, images, n_bn, tmp_path):
    src,learn = plain_export
    dst = tmp_path/'export_folded.pkl'
    res = run_cli(src, '-o', dst)
    assert res.returncode == 0, res.stderr
    assert res.stderr == '', res.stderr                 # loaded by the checking loader: no pickle warning
    out = res.stdout
    print(out)
    assert f'BatchNorm layers folded: {n_bn} of {n_bn}' in out
    folded = load(dst)
    assert f'parameters: {n_params(learn.model):,} -> {n_params(folded.model):,}' in out
    assert f'({src.stat().st_size:,} -> {dst.stat().st_size:,} bytes)' in out
    assert dst.stat().st_size < src.stat().st_size
    m = re.search(r'worst output difference: (\S+) \(tolerance (\S+)\) on a random input of shape \(4, 3, 64, 64\)', out)
    assert m and 0 < float(m[1]) <= float(m[2]), out
    assert len(bn_layers(folded.model)) == 0
    check_export_file(dst)                              # loads without fastfold
    assert_close(preds(folded, images), preds(learn, images), eps=EPS)
    a,b = predict(learn, images[0]),predict(folded, images[0])
    assert a[0] == b[0]
    assert_close(b[2], a[2], eps=EPS)
    mtime = dst.stat().st_mtime_ns                      # (without --force: see `test_cli_bad_input`)
    res = run_cli(src, '-o', dst, '--force')
    assert res.returncode == 0, res.stderr
    assert dst.stat().st_mtime_ns != mtime and len(bn_layers(load(dst).model)) == 0
    assert temp_files(tmp_path) == []

@pytest.mark.parametrize('kind', ['missing', 'text', 'state_dict', 'exists'])
def test_cli_bad_input(kind, plain_export, tmp_path):
    "A bad input is a one-line error on stderr and a non-zero exit, and nothing is written or overwritten"
    src,learn = plain_export
    out = tmp_path/'out.pkl'
    if kind == 'missing': src,why = tmp_path/'nope.pkl','no such file'
    if kind == 'text': src,why = tmp_path/'notes.txt','not a fastai export'; src.write_text('not a learner\n')
    if kind == 'state_dict':
        src,why = tmp_path/'weights.pth','holds a collections.OrderedDict, not a fastai Learner'
        torch.save(learn.model.state_dict(), src)
    if kind == 'exists': why = 'exists: pass --force'; out.write_bytes(b'keep me')
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    res = run_cli(src, '-o', out)
    assert res.returncode != 0
    err = res.stderr.strip()
    assert err.startswith('fastfold-fold: error: ') and '\n' not in err and 'Traceback' not in res.stderr, res.stderr
    assert why in err, err
    assert res.stdout == ''
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert temp_files(tmp_path) == []
