"""What several suites share: no network for the tests that build library models (Hugging Face, ultralytics), and a
Python prelude that makes `fastfold` impossible to import, as on a box where it is not installed."""
import os, socket, tempfile

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
