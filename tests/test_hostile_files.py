"""Hostile learner files: `fastfold-fold`, `fastfold-bench` and `load_learner_checked` load a file through one
unpickler that applies fastfold's allowlist as it builds (issue 25). Each payload of each kind is refused in one line
before any of it runs, nothing is imported because a file names it, and real fastai exports still fold with no flag.

Each payload makes a marker file when it runs. Every refusal test asserts that the marker did not appear, and
`test_payloads_are_live` shows that each payload does make it when the file is loaded without fastfold's check, so
that a refusal test cannot pass because a payload was inert. The commands are run as a user runs them: the console
scripts installed beside this Python, in a new process."""
import builtins, code, copyreg, decimal, functools, io, os, pathlib, pickle, re, subprocess, sys, time, types, warnings
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
from fastfold.export import FoldOnExport, FoldExportError, FoldFileError, check_export_file, fold_learner_file
from fastfold.scan import pickle_refs, torch_pickle, load_learner_checked, load_checked, UnsafeFileError
import fastfold.scan as scan

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

class Raw(bytes):
    "A pickle written as it is: `torch.save(Raw(...), f, pickle_module=RAW)` puts these bytes in `data.pkl`"
class _RawPickler:
    def __init__(self, f, protocol=2): self.f = f
    def dump(self, obj): self.f.write(obj)
RAW = types.SimpleNamespace(Pickler=_RawPickler, __name__='raw')

def by_value(src:str, name:str):
    "The function or class `name` defined by `src` as in a notebook (in `__main__`), which cloudpickle pickles by value"
    ns = {'__name__': '__main__'}
    exec(src, ns)
    return ns[name]

def _newobj_class(name, method, body, state='None'):
    "A class rebuilt by value whose own `method` runs `body`, pickled as `copyreg.__newobj__(cls)` and `BUILD` with `state`"
    return by_value(f'import copyreg\nclass {name}:\n    def {method}:\n        {body}\n        return object.__new__(cls) if "cls" in locals() else 1\n'
                    f'    def __reduce__(self): return copyreg.__newobj__, ({name},), {state}', name)

def payload(kind, marker):
    "An object whose unpickling creates `marker` through `kind`"
    m = str(marker)
    touch = f'open({m!r}, "w").close()'
    if kind == 'system': return Call(os.system, f'touch {m}')
    if kind == 'popen': return Call(subprocess.Popen, ['touch', m])
    if kind == 'exec': return Call(builtins.exec, touch)
    if kind == 'getattr-module': return Call(Call(getattr, os, 'system'), f'touch {m}') # cloudpickle pickles `os` as `subimport('os')`
    if kind == 'getattr-method': return Call(Call(getattr, Call(code.InteractiveInterpreter), 'runsource'), touch)
    if kind == 'getattr-path': return Call(Call(getattr, pathlib.PosixPath(m), 'write_text'), 'x')
    if kind == 'nested-pickle': return Call(torch.storage._load_from_bytes, pickle.dumps(Call(os.system, f'touch {m}')))
    if kind == 'fx-graphmodule': return Call(torch.fx.graph_module.reduce_graph_module, # a GraphModule whose source runs on loading
        {'_code': 'def forward(self, x): return x', '_graphmodule_cls_name': 'GraphModule'}, f'import os; os.system("touch {m}")\n')
    if kind == 'numpy-object-array': a = np.empty(1, dtype=object); a[0] = Call(os.system, f'touch {m}'); return a
    if kind == 'by-value-call': return Call(by_value(f'def f(): {touch}', 'f'))
    if kind == 'by-value-init': C = by_value(f'class C:\n    def __init__(self): {touch}\n    def __reduce__(self): return C, ()', 'C'); return object.__new__(C)
    if kind == 'by-value-new': return object.__new__(_newobj_class('N', '__new__(cls, *a)', touch))
    if kind == 'by-value-setstate': return object.__new__(_newobj_class('S', '__setstate__(self, s)', touch, "{'a': 1}"))
    if kind == 'by-value-setattr': return object.__new__(_newobj_class('A', '__setattr__(self, k, v)', touch, "(None, {'a': 1})"))
    if kind == 'by-value-hash': # armed by its pickled state only: hashing it here, to build the dict, runs nothing
        H = _newobj_class('H', '__hash__(self)', f'if getattr(self, "armed", False): {touch}', "{'armed': True}")
        return {object.__new__(H): 1}
    if kind in RAW_OPS: return Raw(PROTO2 + RAW_OPS[kind](f'touch {m}') + b'.')
    if kind == 'code-function':
        co = compile(touch, '<file>', 'exec')
        args = [co.co_argcount, co.co_posonlyargcount, co.co_kwonlyargcount, co.co_nlocals, co.co_stacksize, co.co_flags, co.co_code,
                co.co_consts, co.co_names, co.co_varnames, co.co_filename, co.co_name, co.co_qualname, co.co_firstlineno,
                co.co_linetable, co.co_exceptiontable, co.co_freevars, co.co_cellvars]
        return Call(Call(types.FunctionType, Call(types.CodeType, *args), {'__builtins__': builtins}))
    if kind == 'inst': return Raw(f'(S"touch {m}"\nios\nsystem\n.'.encode())      # protocol 0's INST
    if kind == 'obj': return Raw(b'\x80\x01(cos\nsystem\nX' + len(f'touch {m}').to_bytes(4, 'little') + f'touch {m}'.encode() + b'o.') # OBJ

def G(mod, name): return b'c' + f'{mod}\n{name}\n'.encode()
def S(x): b = x.encode(); return b'X' + len(b).to_bytes(4, 'little') + b
PROTO2,NS = b'\x80\x02',G('types', 'SimpleNamespace') + b')\x81'   # an empty SimpleNamespace, by NEWOBJ
def PARTIAL(*a): return G('functools', 'partial') + b'(' + G('os', 'system') + b''.join(a) + b'tR' # partial(os.system, *a)
def with_attr(name, value): return b'}' + S(name) + value + b'sb' # BUILD: the object's `__dict__` gets `name`
RAW_OPS = { # crafted pickles for each mechanism of issue 25; each runs `cmd` under Python's pickle
    'instance-setstate': lambda cmd: NS + with_attr('__setstate__', PARTIAL()) + S(cmd) + b'b',     # BUILD calls it
    'append-nonlist': lambda cmd: NS + with_attr('append', PARTIAL()) + S(cmd) + b'a',              # APPEND calls obj.append
    'ordereddict-ducktype': lambda cmd: G('collections', 'OrderedDict') + NS + with_attr('keys', PARTIAL(S(cmd))) + b'\x85R',
    'reconstructor-ducktype': lambda cmd: G('copyreg', '_reconstructor') + G('collections', 'OrderedDict') + G('builtins', 'dict')
                                          + NS + with_attr('keys', PARTIAL(S(cmd))) + b'\x87R',
    'getattr-instance': lambda cmd: G('builtins', 'getattr') + G('unittest.case', 'TestCase') + b')\x81'
                                    + with_attr('failureException', PARTIAL(S(cmd))) + S('failureException') + b'\x86R)R',
    'newobj-installed': lambda cmd: G('tempfile', '_TemporaryFileCloser') + b')\x81' + with_attr('close', PARTIAL(S(cmd))) + b'0N',
    'module-import': lambda cmd: G('test.autotest', 'x'),                                          # would start CPython's tests
    'partial-state-swap': lambda cmd: G('functools', 'partial') + G('builtins', 'int') + b'\x85R'   # partial(int), then its
                                      + b'(' + G('os', 'system') + S(cmd) + b'\x85NNtb)R',            # state: os.system, (cmd,)
}

# what each refusal names: the first global or operation the loader does not allow
NOT_LISTED = 'is not on the allowlist ({} is neither a module fastfold loads from nor one you named)'
BY_VALUE_CLASS = 'cloudpickle.cloudpickle._make_skeleton_class, which rebuilds code from the file (cloudpickle by value): such a file loads only with trust=True'
CALLS = {'system': f'{os.system.__module__}.system ' + NOT_LISTED.format(os.system.__module__), 'popen': 'subprocess.Popen ' + NOT_LISTED.format('subprocess'),
         'exec': 'builtins.exec ' + NOT_LISTED.format('builtins'), 'getattr-module': 'os.system ' + NOT_LISTED.format('os'),
         'getattr-method': 'code.InteractiveInterpreter ' + NOT_LISTED.format('code'),
         'getattr-path': "getattr(pathlib.PosixPath, 'write_text'), which is not on the allowlist (a method fastfold does not list)",
         'nested-pickle': 'torch.storage._load_from_bytes ' + NOT_LISTED.format('torch.storage'),
         'fx-graphmodule': 'torch.fx.graph_module.reduce_graph_module ' + NOT_LISTED.format('torch.fx.graph_module'),
         'numpy-object-array': f'{os.system.__module__}.system ' + NOT_LISTED.format(os.system.__module__),
         'by-value-call': '__main__.f, a function rebuilt from code in the file (cloudpickle by value) that is not installed here: code from the file loads only with trust=True',
         **{f'by-value-{k}': BY_VALUE_CLASS for k in ('init', 'new', 'setstate', 'setattr', 'hash')},
         'inst': 'the INST opcode (classes of Python 2; torch.save never writes it)', 'obj': 'os.system ' + NOT_LISTED.format('os'),
         **{k: 'types.SimpleNamespace ' + NOT_LISTED.format('types') for k in ('instance-setstate', 'append-nonlist', 'ordereddict-ducktype', 'reconstructor-ducktype')},
         'getattr-instance': 'unittest.case.TestCase ' + NOT_LISTED.format('unittest.case'),
         'newobj-installed': 'tempfile._TemporaryFileCloser ' + NOT_LISTED.format('tempfile'),
         'code-function': "cloudpickle's builtin type LambdaType, which is not on the allowlist", # `types.FunctionType`, as cloudpickle names it
         'module-import': 'test.autotest.x ' + NOT_LISTED.format('test.autotest'), 'partial-state-swap': 'os.system ' + NOT_LISTED.format('os')}
KINDS = list(CALLS)
RAW_KINDS = ('inst', 'obj', *RAW_OPS) # whole pickles: at the top of a file only
NOT_LIVE = ('module-import',) # its control would run CPython's test suite

def hostile_file(kind, where, d, tab) -> Path:
    "`d/export.pkl` holding the payload `kind`: at the top of the file, or kept by a real learner exported by fastai"
    fname,p = d/'export.pkl',payload(kind, d/'pwned')
    if isinstance(p, Raw): torch.save(p, fname, pickle_module=RAW)
    elif where == 'top': torch.save({'learner': p}, fname, pickle_module=cloudpickle)
    else:
        tab.payload = p
        try: tab.export(fname) # fastai's own export: cloudpickle, protocol 2
        finally: del tab.payload
    return fname

def run(cmd, *args, **kw): return subprocess.run([str(BIN/cmd), *map(str, args)], capture_output=True, text=True, timeout=600, **kw)

def appeared(marker, wait=5.) -> bool:
    "Did `marker` appear (within `wait` seconds: `Popen` runs its command in the background)?"
    end = time.monotonic() + wait
    while not marker.exists() and time.monotonic() < end: time.sleep(0.1)
    return marker.exists()

CASES = [(k, w) for w in ('top', 'learner') for k in KINDS if w == 'top' or k not in RAW_KINDS]
IDS = [f'{k}-{w}' for k,w in CASES]
# The commands load through the same loader (`fastfold.scan`), which every case meets in-process through
# `load_learner_checked` (and `FoldOnExport`); each command meets a representative subset, at the top of a file and
# inside a real export (a process each, and the file keeps within about five minutes).
FOLD_CASES = [(k, 'top') for k in ('system', 'by-value-call', 'instance-setstate', 'newobj-installed', 'module-import')] + [('getattr-method', 'learner')]
BENCH_CASES = [(k, 'top') for k in ('system', 'reconstructor-ducktype')] + [('by-value-setstate', 'learner')]
ids = lambda cases: [f'{k}-{w}' for k,w in cases]

@pytest.fixture(scope='module')
def tab():
    "A real tabular learner with data (its export is small, and `FoldOnExport` checks on one of its batches)"
    rng = np.random.default_rng(0)
    df = pd.DataFrame(dict(a=rng.choice(['x', 'y', 'z'], 200), b=rng.normal(size=200), c=rng.normal(size=200)))
    df['y'] = ((df.b + (df.a == 'x')) > 0.5).astype(int)
    dls = TabularDataLoaders.from_df(df, cat_names=['a'], cont_names=['b', 'c'], y_names='y', y_block=CategoryBlock,
                                     procs=[Categorify, Normalize], bs=32, valid_idx=list(range(150, 200)), num_workers=0)
    return tabular_learner(dls, layers=[20, 10], metrics=functools.partial(accuracy, axis=-1))

# ---------------------------------------------------------------------------------------------------- refusals

LOAD_ALL = '''import sys, warnings, torch
warnings.simplefilter('ignore')
import fastai.learner
for f in sys.argv[1:]:
    try: torch.load(f, weights_only=False)
    except Exception as e: print(type(e).__name__, e)
'''

def test_payloads_are_live(tab, tmp_path):
    "Control: loaded as `load_learner` loads it (`torch.load`, without fastfold), each file does run its payload"
    files = {case: hostile_file(*case, (tmp_path/'-'.join(case)).mkdir() or tmp_path/'-'.join(case), tab) for case in CASES}
    subprocess.run([sys.executable, '-c', LOAD_ALL, *map(str, files.values())], capture_output=True, timeout=600)
    dead = [case for case,f in files.items() if not appeared(f.parent/'pwned', wait=1) and case[0] not in NOT_LIVE]
    assert dead == []

def is_refusal(line, src, trust='trust=True loads a file from a source you trust') -> bool:
    "One line naming the file, saying that nothing from it ran, and the way out"
    return line.startswith(f'refusing {src}: ') and line.endswith(f'; nothing from the file ran ({trust})')

@pytest.mark.parametrize('kind,where', FOLD_CASES, ids=ids(FOLD_CASES))
def test_fold_refuses(kind, where, tab, tmp_path):
    "`fastfold-fold` refuses the file in one line naming the call, writes nothing, and the payload does not run"
    src = hostile_file(kind, where, tmp_path, tab)
    res = run('fastfold-fold', src, '-o', tmp_path/'out.pkl')
    assert res.returncode == 1 and res.stdout == ''
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and is_refusal(lines[0].removeprefix('fastfold-fold: error: '), src, 'pass --trust to load a file from a source you trust'), res.stderr
    assert f': {CALLS[kind]}; nothing from the file ran' in lines[0], lines[0] # not even fastai's warning: nothing was loaded
    assert not appeared(tmp_path/'pwned', wait=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export.pkl']

@pytest.mark.parametrize('kind,where', BENCH_CASES, ids=ids(BENCH_CASES))
def test_bench_refuses(kind, where, tab, tmp_path):
    "`fastfold-bench file.pkl` refuses it before timing anything, in one line, and the payload does not run"
    src = hostile_file(kind, where, tmp_path, tab)
    res = run('fastfold-bench', src, '--bs', 1, '--size', 32, '--reps', 1, '--warmup', 1, '--min-time', 0, '--fold-reps', 1,
              '--no-progress', '--csv', tmp_path/'b.csv')
    assert res.returncode == 1 and res.stdout == ''
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and is_refusal(lines[0].removeprefix('fastfold-bench: error: '), src, 'pass --trust to load a file from a source you trust'), res.stderr
    assert f': {CALLS[kind]}; nothing from the file ran' in lines[0], lines[0]
    assert not appeared(tmp_path/'pwned', wait=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export.pkl']

@pytest.mark.parametrize('kind,where', CASES, ids=IDS)
def test_load_learner_checked_refuses(kind, where, tab, tmp_path):
    "In Python, `load_learner_checked` refuses the same file the same way; the payload does not run"
    src = hostile_file(kind, where, tmp_path, tab)
    with pytest.raises(UnsafeFileError) as e: load_learner_checked(src)
    assert is_refusal(str(e.value), src) and '\n' not in str(e.value) and e.value.why == CALLS[kind], str(e.value)
    assert not appeared(tmp_path/'pwned', wait=1) and 'test.autotest' not in sys.modules

@pytest.mark.parametrize('kind', [k for k in KINDS if k not in RAW_KINDS])
def test_foldonexport_keeps_no_payload(kind, tab, tmp_path):
    "A learner that keeps such an object is not exported: the written file fails the same check, and is not kept"
    tab.add_cb(FoldOnExport())
    tab.payload = payload(kind, tmp_path/'pwned')
    try:
        with pytest.raises(FoldExportError, match="fastfold's checking loader refuses it"): tab.export(tmp_path/'folded.pkl')
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

def vision_by_value(pets, path):
    label = by_value("def label_func(f): return 'cat' if f.name[0].isupper() else 'dog'", 'label_func')
    dls = ImageDataLoaders.from_path_func(path, pets, label, valid_pct=0.25, seed=0, item_tfms=Resize(64), bs=8, num_workers=0)
    return vision_learner(dls, resnet18, pretrained=False, path=path)

def vision_head(pets, path):
    dls = ImageDataLoaders.from_path_func(path, pets, parent_label, valid_pct=0.25, seed=0, item_tfms=Resize(64), bs=8, num_workers=0)
    return vision_learner(dls, resnet18, pretrained=False, path=path, lin_ftrs=[64], concat_pool=False)

def unet(pets, path):
    "A `unet_learner` whose mask label function is the user's (by reference, in `fastfold_user_models`)"
    um = import_user_module(path)
    dls = SegmentationDataLoaders.from_label_func(path, pets, um.mask_of, codes=['bg', 'fg'],
                                                  item_tfms=Resize(64), bs=8, valid_pct=0.25, seed=0, num_workers=0)
    return unet_learner(dls, resnet18, pretrained=False, path=path)

def vision_regex(pets, path):
    "A label function that fasttransform wraps in a closure of its own (a callable without `__name__`): cloudpickle writes it by value"
    from fastai.data.transforms import RegexLabeller
    from fastcore.basics import using_attr
    dls = ImageDataLoaders.from_path_func(path, pets, using_attr(RegexLabeller(r'^(.*)_\d+\.jpg$'), 'name'), valid_pct=0.25, seed=0,
                                          item_tfms=Resize(64), bs=8, num_workers=0)
    return vision_learner(dls, resnet18, pretrained=False, path=path)

def vision_timm(pets, path):
    dls = ImageDataLoaders.from_path_func(path, pets, parent_label, valid_pct=0.25, seed=0, item_tfms=Resize(64), bs=8, num_workers=0)
    return vision_learner(dls, 'resnet18', pretrained=False, path=path)   # a timm body

def vision_folding(pets, path):
    "A learner with fastfold's callbacks attached: `export` writes it folded, without them"
    from fastfold.freeze import FreezeBN
    learn = vision_head(pets, path)
    for cb in (FreezeBN(), FoldOnExport()): learn.add_cb(cb)
    return learn

USER_MODULE = """from torch import nn
from fastai.callback.core import Callback
class UserModel(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, n)
    def forward(self, x): return self.head(self.body(x))
class UserCallback(Callback):
    order = 5
    def __init__(self, k=3): self.k = k
    def after_batch(self): pass
def mask_of(f): return f.parent.parent/'masks'/f'{f.stem}.png'
"""

def import_user_module(path):
    "`fastfold_user_models`, written in `path` and imported from there, as a user's own module"
    (path/'fastfold_user_models.py').write_text(USER_MODULE)
    sys.modules.pop('fastfold_user_models', None)
    sys.path.insert(0, str(path))
    try: import fastfold_user_models as um
    finally: sys.path.remove(str(path))
    return um

def user_module(pets, path):
    "A model class and a callback class from the user's own module (`fastfold_user_models`, on `PYTHONPATH`)"
    um = import_user_module(path)
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    dls = ImageDataLoaders.from_path_func(path, pets, parent_label, valid_pct=0.25, seed=0, item_tfms=Resize(64), bs=8, num_workers=0)
    return Learner(dls, um.UserModel(), loss_func=CrossEntropyLossFlat(), cbs=um.UserCallback(), path=path)

def text(pets, path):
    from fastai.text.all import TextDataLoaders, text_classifier_learner, AWD_LSTM
    df = pd.DataFrame(dict(text=['a good film', 'a bad film', 'great fun', 'a terrible plot'] * 8, label=['pos', 'neg'] * 16))
    dls = TextDataLoaders.from_df(df, path=path, text_col='text', label_col='label', bs=8, num_workers=0, seq_len=16)
    return text_classifier_learner(dls, AWD_LSTM, pretrained=False, path=path)

def collab(pets, path):
    from fastai.collab import CollabDataLoaders, collab_learner
    rng = np.random.default_rng(0)
    df = pd.DataFrame(dict(user=rng.integers(0, 20, 300), item=rng.integers(0, 30, 300), rating=rng.uniform(1, 5, 300)))
    return collab_learner(CollabDataLoaders.from_df(df, bs=32, num_workers=0), n_factors=8, y_range=(0, 5.5), path=path)

def tabular(pets, path, tab): tab.path = path; return tab

EXPORTS = { # name: (the learner, what makes its export the case it stands for, `export` arguments)
    'vision-label-by-value': (vision_by_value, {'cloudpickle.cloudpickle:_make_function', 'builtins:getattr'}, {}),
    'vision-head': (vision_head, {'fastai.data.transforms:parent_label'}, {}),
    'vision-default-pickler': (vision_head, {'fastai.data.transforms:parent_label'}, {'pickle_module': pickle}),
    'vision-timm': (vision_timm, {'timm.models.resnet:ResNet'}, {}),
    'vision-regex-labeller': (vision_regex, {'fastai.data.transforms:RegexLabeller', 'cloudpickle.cloudpickle:_make_function'}, {}),
    'vision-freezebn-foldonexport': (vision_folding, {'torch.nn.modules.linear:Identity'}, {}),
    'user-module': (user_module, {'fastfold_user_models:UserModel', 'fastfold_user_models:UserCallback'}, {}),
    'tabular': (tabular, {'functools:partial', 'builtins:getattr'}, {}),
    'unet': (unet, {'fastfold_user_models:mask_of', 'fastai.callback.hook:Hook'}, {}),
    'text': (text, {'fastai.text.models.awdlstm:AWD_LSTM', 'spacy.tokenizer:Tokenizer'}, {}),
    'collab': (collab, {'fastai.collab:EmbeddingDotBias'}, {})}

FLAGS = {'vision-label-by-value': ['--trust'], # its label function is defined in a notebook: by value
         'user-module': ['--import', 'fastfold_user_models'], 'unet': ['--import', 'fastfold_user_models']} # the user's own module

CLI_EXPORTS = ('vision-label-by-value', 'vision-head', 'vision-timm', 'user-module', 'tabular') # by the command, a process each;
# the others by `fold_learner_file` in this process (the command's own function), which keeps the file within its time budget

@pytest.mark.parametrize('name', list(EXPORTS))
def test_normal_exports_fold(name, pets, tab, tmp_path):
    "A real fastai export folds with no flag (or with the one it needs: --import for the user's module, --trust for code by value)"
    make,expected,kw = EXPORTS[name]
    flags = FLAGS.get(name, [])
    learn = make(pets, tmp_path, tab) if make is tabular else make(pets, tmp_path)
    learn.export('export.pkl', **kw)
    src,dst = tmp_path/'export.pkl',tmp_path/'folded.pkl'
    refs = pickle_refs(torch_pickle(src.read_bytes()))
    assert expected <= refs, expected - refs
    trust,modules = '--trust' in flags,[f for f in flags if not f.startswith('--')]
    why = ('cloudpickle by value', 'trust') if trust else ('fastfold_user_models.', 'nor one you named')
    if name in CLI_EXPORTS:
        env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')])} # the user's module
        if flags: # refused without the switch, and the refusal says which
            res = run('fastfold-fold', src, '-o', dst, env=env)
            assert res.returncode == 1 and all(w in res.stderr for w in why) and not dst.exists(), res.stderr
        res = run('fastfold-fold', src, '-o', dst, *flags, env=env)
        assert res.returncode == 0, res.stderr
        if trust: assert FASTAI_WARNING.search(res.stderr) and FASTAI_WARNING.sub('', res.stderr) == '', res.stderr
        else: assert res.stderr == '', res.stderr     # loaded by the checking loader: no pickle warning, nothing else
        out = res.stdout
    else:
        if trust: # the user's module is imported in this process, and so allowed without naming it
            with pytest.raises(FoldFileError) as e: fold_learner_file(src, dst)
            assert all(w in str(e.value) for w in why) and not dst.exists(), str(e.value)
        out = str(fold_learner_file(src, dst, trust=trust, modules=modules))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        n_bn = len(bn_layers(load_learner(src).model))  # our own file: what the export holds (FoldOnExport writes it folded)
        m = re.search(r'BatchNorm layers folded: (\d+) of (\d+)', out)
        assert m and int(m[2]) == n_bn and (int(m[1]) > 0 if n_bn else int(m[1]) == 0), out
        print(f'{name}:\n{out}')
        check_export_file(dst, trust=trust)
        folded = load_learner(dst)
        if not trust: load_learner_checked(src)   # in Python too, with the user's module imported: no argument needed
    assert len(bn_layers(folded.model)) == n_bn - int(m[1])

# ---------------------------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize('cmd,says', [('fastfold-fold', ('allowlist as it builds', 'by value', 'nothing from the file runs', '--import', '--trust')),
                                      ('fastfold-bench', ('checking loader', '--import', '--trust'))])
def test_help_states_the_trust_model(cmd, says):
    "`--help` says how files are checked, what passing means, and the switch"
    out = ' '.join(run(cmd, '--help').stdout.split())
    assert all(s in out for s in says), out

def test_trust_loads_what_the_check_refuses(tab, tmp_path):
    "`--trust` folds a file whose pickle makes a call not on the list; the folded file keeps that call and nothing more"
    tab.path,tab.payload = tmp_path,decimal.Decimal('3') # harmless, but pickled as a call of `decimal.Decimal`, not on the list
    try: tab.export('export.pkl')
    finally: del tab.payload
    src,dst = tmp_path/'export.pkl',tmp_path/'folded.pkl'
    res = run('fastfold-fold', src, '-o', dst)
    assert res.returncode == 1 and 'decimal.Decimal is not on the allowlist' in res.stderr and '--trust' in res.stderr, res.stderr
    assert not dst.exists()
    res = run('fastfold-fold', src, '-o', dst, '--trust')
    assert res.returncode == 0 and FASTAI_WARNING.search(res.stderr), res.stderr
    assert 'decimal:Decimal' in pickle_refs(torch_pickle(dst.read_bytes()))
    with pytest.raises(UnsafeFileError, match='decimal.Decimal is not on the allowlist'): load_learner_checked(dst)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert load_learner_checked(dst, trust=True).payload == decimal.Decimal('3')

def inject(src, dst, cmd):
    "A copy of the export `src` with `os.system(cmd)` added before its pickle's final STOP (and popped): the rest is as fastai wrote it"
    import zipfile
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, 'w', zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            data = zi.read(info)
            if info.filename.endswith('/data.pkl'):
                assert data.endswith(b'.')
                data = data[:-1] + G('os', 'system') + S(cmd) + b'\x85R0.'
            zo.writestr(info, data)

def test_payload_injected_into_a_real_export(tab, tmp_path):
    "A real export with a payload before its STOP: it runs under `load_learner`, and is refused by fastfold, in Python and by the command"
    tab.path = tmp_path
    tab.export('clean.pkl')
    for d in ('live', 'checked'): (tmp_path/d).mkdir(); inject(tmp_path/'clean.pkl', tmp_path/d/'export.pkl', f'touch {tmp_path/d/"pwned"}')
    subprocess.run([sys.executable, '-c', LOAD_ALL, str(tmp_path/'live'/'export.pkl')], capture_output=True, timeout=600)
    assert appeared(tmp_path/'live'/'pwned') # the control: the payload is live
    src = tmp_path/'checked'/'export.pkl'
    with pytest.raises(UnsafeFileError, match='os.system is not on the allowlist'): load_learner_checked(src)
    res = run('fastfold-fold', src, '-o', tmp_path/'checked'/'out.pkl')
    assert res.returncode == 1 and 'os.system is not on the allowlist' in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path/'checked').iterdir()) == ['export.pkl']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        load_learner_checked(tmp_path/'clean.pkl')     # the same export without the payload loads

def test_module_beside_the_file_is_not_imported(tmp_path):
    "A file that only names a module lying on `sys.path` is refused, and the module is not imported (its code would make the marker)"
    (tmp_path/'evil_mod_ff.py').write_text(f'open({str(tmp_path/"pwned")!r}, "w").close()\nx = 1\n')
    torch.save(Raw(PROTO2 + G('evil_mod_ff', 'x') + b'.'), tmp_path/'export.pkl', pickle_module=RAW)
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(UnsafeFileError, match='evil_mod_ff.x is not on the allowlist'): load_learner_checked(tmp_path/'export.pkl')
        assert 'evil_mod_ff' not in sys.modules and not (tmp_path/'pwned').exists()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.load(tmp_path/'export.pkl', weights_only=False)      # the control: Python's pickle imports it
        assert (tmp_path/'pwned').exists()
    finally: sys.path.remove(str(tmp_path)); sys.modules.pop('evil_mod_ff', None)

def test_main_label_function_by_reference(pets, tmp_path):
    "fastai's default pickler stores a `__main__` label function by reference: it loads once defined, as fastai's docs require"
    import __main__
    def label_func(f): return 'cat' if f.name[0].isupper() else 'dog'
    label_func.__module__,label_func.__qualname__ = '__main__','label_func'
    __main__.label_func = label_func
    try:
        dls = ImageDataLoaders.from_path_func(tmp_path, pets, label_func, valid_pct=0.25, seed=0, item_tfms=Resize(64), bs=8, num_workers=0)
        vision_learner(dls, resnet18, pretrained=False, path=tmp_path).export('export.pkl', pickle_module=pickle)
        assert '__main__:label_func' in pickle_refs(torch_pickle((tmp_path/'export.pkl').read_bytes()))
        assert load_learner_checked(tmp_path/'export.pkl').dls.vocab == ['cat', 'dog']
    finally: del __main__.label_func
    with pytest.raises(UnsafeFileError, match='__main__.label_func is not defined in __main__'): load_learner_checked(tmp_path/'export.pkl')

def test_reexport_in_main_is_refused(tmp_path):
    "`from os import system` in a notebook does not make `__main__.system` loadable: only what `__main__` defines"
    import __main__
    marker = tmp_path/'pwned'
    data = PROTO2 + G('__main__', 'system') + S(f'touch {marker}') + b'\x85R.'
    __main__.system = os.system
    try:
        torch.save(Raw(data), tmp_path/'export.pkl', pickle_module=RAW)
        with pytest.raises(UnsafeFileError, match=re.escape('__main__.system is not defined in __main__ (it is imported there)')):
            load_learner_checked(tmp_path/'export.pkl')
        assert not marker.exists()
        pickle.loads(data); assert marker.exists() # the control: Python's pickle takes it, and runs it
    finally: del __main__.system

def test_library_function_held_by_a_layer_is_refused(tmp_path):
    """A function of an allowed library that runs code when called (fastcore's `exec_local`), held by fastai's `Lambda`
    layer: it would run when the model runs, as `fastfold-fold` runs it. Library functions load only when listed."""
    from fastcore.basics import exec_local
    from fastai.layers import Lambda
    marker = tmp_path/'pwned'
    torch.save({'model': torch.nn.Sequential(Lambda(functools.partial(exec_local, f'open({str(marker)!r}, "w").close()')))}, tmp_path/'export.pkl')
    with pytest.raises(UnsafeFileError, match=re.escape('fastcore.basics.exec_local is not on the allowlist')): load_checked(tmp_path/'export.pkl')
    res = run('fastfold-fold', tmp_path/'export.pkl', '-o', tmp_path/'out.pkl')
    assert res.returncode == 1 and 'fastcore.basics.exec_local is not on the allowlist' in res.stderr, res.stderr
    assert not marker.exists() and not (tmp_path/'out.pkl').exists()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = torch.load(tmp_path/'export.pkl', weights_only=False)['model'] # the control: Python's pickle loads it
    with pytest.raises(KeyError): model(torch.ones(1))                          # and the model runs the code (then fails)
    assert marker.exists()

def test_state_may_not_set_copy_hooks():
    "No object gets a callable `__deepcopy__` (or another name `copy` and `pickle` look up on the object) from its state"
    from fastfold.scan import CheckedUnpickler
    for mod,cls in (('torch.nn.modules.linear', 'Identity'), ('fastai.learner', 'Recorder')): # a listed `__setstate__`; a plain update
        data = PROTO2 + G(mod, cls) + b')\x81}' + S('__deepcopy__') + G('fastai.imports', 'noop') + b'sb.'
        with pytest.raises(UnsafeFileError, match="state sets '__deepcopy__' to fastai.imports.noop"): CheckedUnpickler(io.BytesIO(data)).load()

REC = G('fastai.learner', 'Recorder') + b')\x81' # an object of an allowed class with a plain `__new__`, built by NEWOBJ
LAYERS = { # each rule on its own, with globals `find_class` lets through: (pickle, what the refusal says)
    'append-to-an-object': (REC + S('x') + b'a', 'adding items to a fastai.learner.Recorder, which is not a list the file built'),
    'setitem-on-a-class': (G('collections', 'OrderedDict') + S('k') + S('v') + b's', 'adding items to collections.OrderedDict, which is not a dict the file built'),
    'build-on-a-function': (G('fastai.imports', 'noop') + b'}' + S('a') + S('b') + b'sb', 'BUILD on fastai.imports.noop, which the file did not build (it would change it)'),
    'call-not-listed': (G('fastai.learner', 'Recorder') + b')R', 'a call of fastai.learner.Recorder, which is not on the allowlist of what a file may call'),
    'ducktyped-argument': (G('collections', 'OrderedDict') + REC + b'\x85R', 'collections.OrderedDict with a Recorder as argument 1, which it does not take'),
    'reconstructor-state': (G('copyreg', '_reconstructor') + G('collections', 'OrderedDict') + G('builtins', 'dict') + REC + b'\x87R',
                            'copyreg._reconstructor with base builtins.dict and a Recorder'),
    'setstate-of-an-object': (G('torch.nn.modules.linear', 'Identity') + b')\x81' + REC + b'b', 'torch.nn.modules.linear.Identity.__setstate__ of a Recorder, which is not plain data'),
    'getattr-on-the-object': (G('builtins', 'getattr') + REC + with_attr('hook', G('fastai.imports', 'noop')) + S('hook') + b'\x86R',
                              "getattr(a fastai.learner.Recorder, 'hook'): its class has no such attribute"),
    'newobj-own-new': (G('pathlib', 'PosixPath') + b')\x81', 'building a pathlib.PosixPath, whose __new__ is not on the allowlist'),
    'newobj-a-class': (G('fastcore.meta', 'FixSigMeta') + b')\x81', 'building a fastcore.meta.FixSigMeta (a class or code)'),
    'code-type': (G('types', 'CodeType'), 'types.CodeType, which rebuilds code from the file (cloudpickle by value): such a file loads only with trust=True'),
    'persistent-id': (S('storage') + b'Q', 'a persistent id that is not a torch storage'),
    'extension': (b'\x82\x01', 'a global from the extension registry (torch.save never writes one)'),
}

@pytest.mark.parametrize('case', list(LAYERS))
def test_each_rule_holds_on_its_own(case):
    "What `find_class` lets through still meets the rule of each opcode: these stay refused when `find_class` is loosened"
    from fastfold.scan import CheckedUnpickler
    data,why = LAYERS[case]
    with pytest.raises(UnsafeFileError) as e: CheckedUnpickler(io.BytesIO(PROTO2 + data + b'.')).load()
    assert str(e.value) == why, str(e.value)

def test_loads_after_torch_compile(tmp_path, tab):
    "`torch.compile` replaces `nn.Module.__setstate__` in the process (with torch's own wrapper): files still load"
    from torch._dynamo.mutation_guard import install_generation_tagging_init
    tab.path = tmp_path
    tab.export('export.pkl')
    load_learner_checked(tmp_path/'export.pkl') # the loader's tables are made once, before torch.compile may run
    install_generation_tagging_init()
    assert vars(torch.nn.Module)['__setstate__'].__qualname__ == 'install_generation_tagging_init.<locals>.patched_setstate'
    assert type(load_learner_checked(tmp_path/'export.pkl').model) is type(tab.model)

# ---------------------------------------------------------------------------------------------------- review of issue 25
# A private class of a listed library whose objects run the names their state holds when called (`fastcore.basics._Self`:
# getattr and call, step by step, from a class to `os.system`), made callable from the state of an object the file
# builds, and called by code that looks a method up on that object: a listed `__setstate__` (`Stateful`'s
# `self._init_state()`), a listed `__del__` (`HookCallback`'s `self._remove()`), or fastai's `load_learner` after the load
# (`res.dls.cpu()` sets the device of each loader: `dl.to(device)`).
def _self_chain(cmd, start=()):
    "`fastcore.basics._Self` steps that run `cmd` from a class (`start` first): `cls.__init__.__globals__['os'].system(cmd)`"
    import fastcore.basics as fb
    return fb._Self((*start, ('__init__',None,None), ('__globals__',None,None), ('__getitem__',('os',),{}) if not start else
                     ('__getitem__',('system',),{}), *([('system',(cmd,),{})] if not start else [('__call__',(cmd,),{})])))

def _gadget(kind, m):
    import fastcore.basics as fb
    from fastai.callback.hook import HookCallback
    from fastai.data.core import DataLoaders
    call = functools.partial(_self_chain(f'touch {m}'), fb.Stateful)
    if kind.endswith('stateful-setstate'): o = object.__new__(fb.Stateful); o.__dict__['_init_state'] = call; return o
    if kind.endswith('hook-del'): o = object.__new__(HookCallback); o.__dict__['_remove'] = call; return [o]
    # `DataLoaders.cpu` sets `device`, whose setter calls `dl.to(device)`: a chain from the device's class to `os.system`
    sub = ('__class__',None,None), ('__base__',None,None), ('__subclasses__',(),{}), ('__getitem__',(object.__subclasses__().index(os._wrap_close),),{})
    top,dls,dl = object.__new__(fb.NotStr),object.__new__(DataLoaders),object.__new__(fb.NotStr)
    dl.__dict__['to'] = _self_chain(f'touch {m}', sub)
    dls.__dict__['loaders'] = [dl]; top.__dict__['dls'] = dls
    return top

GADGETS = {'self-stateful-setstate': 'fastcore.basics._Self is not on the allowlist (a private class of fastcore whose objects, called, run what they hold)',
           'self-hook-del': 'fastcore.basics._Self is not on the allowlist (a private class of fastcore whose objects, called, run what they hold)',
           'self-dls-to': 'fastcore.basics._Self is not on the allowlist (a private class of fastcore whose objects, called, run what they hold)'}

@pytest.mark.parametrize('kind', list(GADGETS))
def test_gadget_called_through_a_method_lookup(kind, tmp_path):
    "Live under `torch.load`; refused by the checking loader, with no marker, when loaded as `fastfold` loads learners"
    import gc
    f,m = tmp_path/'export.pkl',tmp_path/'pwned'
    torch.save(_gadget(kind, m), f, pickle_module=cloudpickle); gc.collect()
    load = lambda f: load_learner(f, pickle_module=pickle) if kind.endswith('dls-to') else torch.load(f, weights_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        try: load(f)
        except Exception: pass # the payload ran first
    gc.collect()
    assert m.exists(), 'the payload is not live'
    m.unlink()
    checked = load_learner_checked if kind.endswith('dls-to') else load_checked
    with pytest.raises(UnsafeFileError) as e: checked(f)
    gc.collect()
    assert not m.exists()
    assert e.value.why == GADGETS[kind], e.value.why

def _poisoned_tensors(m):
    "A fastai tensor and a parameter whose state (set by torch with `setattr`) gives them a `__deepcopy__` that creates `m`"
    from fastai.torch_core import TensorBase
    t,p = TensorBase(torch.zeros(2)),torch.nn.Parameter(torch.zeros(2))
    for x in (t, p): x.__dict__['__deepcopy__'] = functools.partial(np.memmap, str(m), mode='w+', shape=(1,))
    return t,p

@pytest.mark.parametrize('which,cls', [(0, 'fastai.torch_core.TensorBase'), (1, 'torch.nn.parameter.Parameter')])
def test_tensor_state_may_not_set_copy_hooks(which, cls, tmp_path):
    "`_rebuild_from_type_v2` and `_rebuild_parameter_with_state` set a tensor's state: the rule on copy hooks holds there too (fastfold deep-copies models)"
    import copy
    f,m = tmp_path/'export.pkl',tmp_path/'pwned'
    torch.save({'w': _poisoned_tensors(m)[which]}, f)
    try: copy.deepcopy(torch.load(f, weights_only=False)) # control: torch's own load, then a copy, as folding makes
    except Exception: pass # the payload ran first
    assert m.exists(), 'the payload is not live'
    m.unlink()
    with pytest.raises(UnsafeFileError) as e: copy.deepcopy(load_checked(f))
    assert e.value.why == f"a {cls} whose state sets '__deepcopy__' to functools.partial (copying it would call that)", e.value.why
    assert not m.exists()

def _hashed_key(m):
    "`{FT(...): 1}`: fastcore's `FT.__hash__` hashes `self.attrs.items()`, where `items` is the file's `numpy.memmap(m, ...)`"
    import fastcore.basics as fb, fastcore.xml as fx
    attrs = object.__new__(fb.NotStr)
    attrs.__dict__['items'] = functools.partial(np.memmap, str(m), mode='w+', shape=(1,)) # creates the file `m`
    k = object.__new__(fx.FT); k.__dict__.update(tag='a', attrs=attrs, children=())
    return Raw(PROTO2 + b'}' + pickle.dumps(k, protocol=2)[2:-1] + b'K\x01s.') # the key is hashed as the dict is built

def test_dict_key_hashed_by_its_class_code(tmp_path):
    "A key whose class hashes it with Python code that reads its state: live under `torch.load`, refused before it is hashed"
    f,m = tmp_path/'export.pkl',tmp_path/'pwned'
    torch.save(_hashed_key(m), f, pickle_module=RAW)
    try: torch.load(f, weights_only=False)
    except Exception: pass # the payload ran first
    assert m.exists(), 'the payload is not live'
    m.unlink()
    with pytest.raises(UnsafeFileError) as e: load_checked(f)
    assert e.value.why == 'a fastcore.xml.FT as a key of a dict or set (its class hashes or compares it with Python code, which reads its state)', e.value.why
    assert not m.exists()
