"""What several suites share: no network for the tests that build library models (Hugging Face, ultralytics), a
Python prelude that makes `fastfold` impossible to import, as on a box where it is not installed, and the tiny image
data and one-thread setting of the FreezeBN suites."""
import os, socket, tempfile
import pytest

def offline_env():
    "Tell Hugging Face and ultralytics they are offline, and keep ultralytics' settings in a temporary folder (not ~/.config); call before importing them"
    os.environ.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', YOLO_OFFLINE='1')
    os.environ.setdefault('YOLO_CONFIG_DIR', tempfile.mkdtemp(prefix='fastfold-yolo-'))

def refuse_network(monkeypatch):
    "Any attempt to reach the network fails the test that made it"
    def refuse(*a, **k): raise AssertionError('a test tried to reach the network')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)

# the start of a script run with `python -c`: fastfold cannot be imported, fastai's `load_learner` is there
NO_FASTFOLD_PRELUDE = r'''
import sys, json, warnings
class NoFastfold:
    "An import hook that makes `fastfold` impossible to import, as on a box where it is not installed"
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'fastfold': raise ModuleNotFoundError(f'No module named {name!r}', name=name)
sys.meta_path.insert(0, NoFastfold())
try: import fastfold
except ImportError: pass
else: sys.exit('fastfold could be imported')
import torch
from fastai.learner import load_learner
warnings.simplefilter('ignore')
'''

@pytest.fixture(autouse=True, scope='module')
def one_torch_thread():
    "Import into a suite of tiny tensors: one thread is faster than two there, and much faster on a busy 2-core machine"
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def image_dls(n=16, bs=4, size=32, seed=0, shuffle=True):
    """Random 3x`size`x`size` images labelled by which of the first two channels is brighter. `shuffle`: fastai's
    default loaders (the training one shuffled, its last partial batch dropped); else the training batches in a fixed order"""
    import torch
    from torch.utils.data import TensorDataset
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    g = torch.Generator().manual_seed(seed)
    def ds(n):
        x = torch.randn(n, 3, size, size, generator=g)
        return TensorDataset(x, (x[:,0].mean((1,2)) > x[:,1].mean((1,2))).long())
    if shuffle: return DataLoaders.from_dsets(ds(n), ds(n//2), bs=bs, device='cpu')
    return DataLoaders(DataLoader(ds(n), bs=bs, shuffle=False), DataLoader(ds(n//2), bs=bs), device='cpu')
