"""Hostile learner files: `fastfold-fold` and `fastfold-bench` refuse a file whose pickle would run a command, in one
line and before any of it runs, and still fold real fastai exports (issue 11).

Each payload makes a marker file when it runs. Every refusal test asserts that the marker did not appear, and
`test_payloads_are_live` shows that each payload does make it when the file is loaded without fastfold's check, so
that a refusal test cannot pass because a payload was inert. The commands are run as a user runs them: the console
scripts installed beside this Python, in a new process."""
import builtins, functools, os, re, subprocess, sys, time, warnings
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch, cloudpickle
from PIL import Image
from fastai.data.external import untar_data, URLs
from fastai.data.transforms import parent_label
from fastai.learner import load_learner
from fastai.metrics import accuracy
from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, Normalize, CategoryBlock
from fastai.vision.all import ImageDataLoaders, SegmentationDataLoaders, Resize, vision_learner, unet_learner, resnet18
from fastfold.layers import bn_layers
from fastfold.export import FoldOnExport, FoldExportError, check_export_file
from fastfold.scan import pickle_refs, torch_pickle

pytestmark = pytest.mark.slow # starts a process for each command it runs
BIN = Path(sys.executable).parent
# fastai's warning that `load_learner` runs code from the file: shown on purpose whenever a learner file is loaded
FASTAI_WARNING = re.compile(r"^.*UserWarning: load_learner` uses Python's insecure pickle module.*\n.*\n\s+warn\(.*\n", re.M)

# ---------------------------------------------------------------------------------------------------- payloads
class Call:
    "Pickles as the call `f(*args)`: what a crafted file holds"
    def __init__(self, f, *args): self.f,self.args = f,args
    def __reduce__(self): return self.f, self.args
    def __call__(self, *args): raise TypeError('only for pickling') # `pickle` wants a callable as `__reduce__`'s first item

KINDS = ['system', 'popen', 'exec', 'getattr']
CALLS = dict(system=f'{os.system.__module__}.system', popen='subprocess.Popen', exec='builtins.exec', getattr='os.system')

def payload(kind, marker):
    "An object whose unpickling creates `marker` through `kind`"
    if kind == 'system': return Call(os.system, f'touch {marker}')
    if kind == 'popen': return Call(subprocess.Popen, ['touch', str(marker)])
    if kind == 'exec': return Call(builtins.exec, f'open({str(marker)!r}, "w").close()')
    return Call(Call(getattr, os, 'system'), f'touch {marker}') # cloudpickle pickles `os` as `subimport('os')`

@pytest.fixture(scope='module')
def tab():
    "A real tabular learner with data (its export is small, and `FoldOnExport` checks on one of its batches)"
    rng = np.random.default_rng(0)
    df = pd.DataFrame(dict(a=rng.choice(['x', 'y', 'z'], 200), b=rng.normal(size=200), c=rng.normal(size=200)))
    df['y'] = ((df.b + (df.a == 'x')) > 0.5).astype(int)
    dls = TabularDataLoaders.from_df(df, cat_names=['a'], cont_names=['b', 'c'], y_names='y', y_block=CategoryBlock,
                                     procs=[Categorify, Normalize], bs=32, valid_idx=list(range(150, 200)), num_workers=0)
    return tabular_learner(dls, layers=[20, 10], metrics=functools.partial(accuracy, axis=-1))

def hostile_file(kind, where, d, tab) -> Path:
    "`d/export.pkl` holding the payload `kind`: at the top of the file, or kept by a real learner exported by fastai"
    fname = d/'export.pkl'
    if where == 'top': torch.save({'learner': payload(kind, d/'pwned')}, fname, pickle_module=cloudpickle)
    else:
        tab.payload = payload(kind, d/'pwned')
        try: tab.export(fname) # fastai's own export: cloudpickle, protocol 2
        finally: del tab.payload
    return fname

def run(cmd, *args, **kw): return subprocess.run([str(BIN/cmd), *map(str, args)], capture_output=True, text=True, timeout=600, **kw)

def appeared(marker, wait=5.) -> bool:
    "Did `marker` appear (within `wait` seconds: `Popen` runs its command in the background)?"
    end = time.monotonic() + wait
    while not marker.exists() and time.monotonic() < end: time.sleep(0.1)
    return marker.exists()

CASES = [(k, w) for w in ('top', 'learner') for k in KINDS]
IDS = [f'{k}-{w}' for k,w in CASES]

# ---------------------------------------------------------------------------------------------------- refusals
LOAD = '''import sys, warnings, torch
warnings.simplefilter('ignore')
import fastai.learner
try: torch.load(sys.argv[1], weights_only=False)
except Exception as e: print(type(e).__name__, e)
'''

@pytest.mark.parametrize('kind,where', CASES, ids=IDS)
def test_payloads_are_live(kind, where, tab, tmp_path):
    "Control: loaded as `load_learner` loads it (`torch.load`, without fastfold), each file does run its payload"
    src = hostile_file(kind, where, tmp_path, tab)
    subprocess.run([sys.executable, '-c', LOAD, str(src)], capture_output=True, timeout=300)
    assert appeared(tmp_path/'pwned')

def refusal(cmd, src, kind) -> str:
    return (f'{cmd}: error: refusing {src}: loading it would call {CALLS[kind]}, which can run commands or code, '
            'or reach the OS or the network; nothing from the file was run')

@pytest.mark.parametrize('kind,where', CASES, ids=IDS)
def test_fold_refuses(kind, where, tab, tmp_path):
    "`fastfold-fold` refuses the file in one line naming the call, writes nothing, and the payload does not run"
    src = hostile_file(kind, where, tmp_path, tab)
    res = run('fastfold-fold', src, '-o', tmp_path/'out.pkl')
    assert res.returncode == 1 and res.stdout == ''
    assert res.stderr.splitlines() == [refusal('fastfold-fold', src, kind)], res.stderr # not even fastai's warning: nothing was loaded
    assert not appeared(tmp_path/'pwned', wait=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export.pkl']

@pytest.mark.parametrize('kind,where', CASES, ids=IDS)
def test_bench_refuses(kind, where, tab, tmp_path):
    "`fastfold-bench file.pkl` refuses it before timing anything, in one line, and the payload does not run"
    src = hostile_file(kind, where, tmp_path, tab)
    res = run('fastfold-bench', src, '--bs', 1, '--size', 32, '--reps', 1, '--warmup', 1, '--min-time', 0, '--fold-reps', 1,
              '--no-progress', '--csv', tmp_path/'b.csv')
    assert res.returncode == 1 and res.stdout == ''
    assert res.stderr.splitlines() == [refusal('fastfold-bench', src, kind)], res.stderr
    assert not appeared(tmp_path/'pwned', wait=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export.pkl']

@pytest.mark.parametrize('kind', KINDS)
def test_foldonexport_keeps_no_payload(kind, tab, tmp_path):
    "A learner that keeps such an object is not exported: the written file fails the same check, and is not kept"
    tab.add_cb(FoldOnExport())
    tab.payload = payload(kind, tmp_path/'pwned')
    try:
        with pytest.raises(FoldExportError, match=re.escape(f'would call {CALLS[kind]},')): tab.export(tmp_path/'folded.pkl')
    finally: del tab.payload; tab.remove_cb(FoldOnExport)
    assert list(tmp_path.iterdir()) == [] and not appeared(tmp_path/'pwned', wait=1)
    tab.export(tmp_path/'fastai.pkl')                  # without the payload, fastai's own export of the same learner
    check_export_file(tmp_path/'fastai.pkl')           # passes the check

# ---------------------------------------------------------------------------------------------------- normal exports
N_PER_CLASS = 16

@pytest.fixture(scope='module')
def pets(tmp_path_factory):
    "16 cat and 16 dog Pets images (cats are capitalised) in `cat/` and `dog/`, and a mask for each in `masks/`"
    src = sorted((untar_data(URLs.PETS)/'images').glob('*.jpg'))
    d = tmp_path_factory.mktemp('pets')
    for cls,fs in (('cat', [f for f in src if f.name[0].isupper()]), ('dog', [f for f in src if f.name[0].islower()])):
        (d/cls).mkdir()
        for f in fs[:N_PER_CLASS]: (d/cls/f.name).symlink_to(f)
    (d/'masks').mkdir()
    files = sorted(d.glob('*/*.jpg'))
    for f in files: Image.fromarray((np.array(Image.open(f).convert('L').resize((64, 64))) > 128).astype(np.uint8)).save(d/'masks'/f'{f.stem}.png')
    print(f'tests/test_hostile_files.py: {len(files)} of the {len(src)} Pets images')
    return files

def by_value(source:str, name:str):
    "The function `name` defined by `source` as in a notebook (in `__main__`), which cloudpickle pickles by value"
    ns = {'__name__': '__main__'}
    exec(source, ns)
    return ns[name]

def vision_by_value(pets, path):
    label = by_value("def label_func(f): return 'cat' if f.name[0].isupper() else 'dog'", 'label_func')
    dls = ImageDataLoaders.from_path_func(path, pets, label, valid_pct=0.25, seed=0, item_tfms=Resize(64), bs=8, num_workers=0)
    return vision_learner(dls, resnet18, pretrained=False, path=path)

def vision_head(pets, path):
    dls = ImageDataLoaders.from_path_func(path, pets, parent_label, valid_pct=0.25, seed=0, item_tfms=Resize(64), bs=8, num_workers=0)
    return vision_learner(dls, resnet18, pretrained=False, path=path, lin_ftrs=[64], concat_pool=False)

def unet(pets, path):
    masks = pets[0].parent.parent/'masks'
    dls = SegmentationDataLoaders.from_label_func(path, pets, lambda f: masks/f'{f.stem}.png', codes=['bg', 'fg'], # a lambda:
                                                  item_tfms=Resize(64), bs=8, valid_pct=0.25, seed=0, num_workers=0) # by value
    return unet_learner(dls, resnet18, pretrained=False, path=path)

def tabular(pets, path, tab): tab.path = path; return tab

EXPORTS = {'vision-label-by-value': (vision_by_value, {'cloudpickle.cloudpickle:_make_function', 'builtins:getattr'}),
           'vision-head': (vision_head, {'fastai.data.transforms:parent_label'}),
           'tabular': (tabular, {'functools:partial', 'builtins:getattr'}),
           'unet': (unet, {'cloudpickle.cloudpickle:_make_function', 'fastai.callback.hook:Hook.hook_fn'})}

@pytest.mark.parametrize('name', list(EXPORTS))
def test_normal_exports_fold(name, pets, tab, tmp_path):
    "A real fastai export folds with no extra flag; the folded file passes the same check and loads with fastai"
    make,expected = EXPORTS[name]
    learn = make(pets, tmp_path, tab) if make is tabular else make(pets, tmp_path)
    learn.export('export.pkl')
    src,dst = tmp_path/'export.pkl',tmp_path/'folded.pkl'
    refs = pickle_refs(torch_pickle(src.read_bytes()))
    assert expected <= refs, expected - refs            # what makes this export the case it stands for
    res = run('fastfold-fold', src, '-o', dst)
    assert res.returncode == 0, res.stderr
    assert FASTAI_WARNING.search(res.stderr) and FASTAI_WARNING.sub('', res.stderr) == '', res.stderr
    n_bn = len(bn_layers(learn.model))
    m = re.search(r'BatchNorm layers folded: (\d+) of (\d+)', res.stdout)
    assert m and int(m[2]) == n_bn and int(m[1]) > 0, res.stdout
    print(f'{name}:\n{res.stdout}')
    check_export_file(dst)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        folded = load_learner(dst)
    assert len(bn_layers(folded.model)) == n_bn - int(m[1])
