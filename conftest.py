"Test setup shared by `tests/`: the `--quick` switch and offline data for fastai's `untar_data`."
import os, tempfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent
SHARED_DATA = ROOT.parent/'shared'/'data'

def pytest_addoption(parser):
    parser.addoption('--quick', action='store_true',
                     help='skip tests marked slow and the `#| slow` notebook cells (training on real images)')

def pytest_collection_modifyitems(config, items):
    if not config.getoption('--quick'): return
    skip = pytest.mark.skip(reason='--quick skips slow tests')
    for item in items:
        if 'slow' in item.keywords: item.add_marker(skip)

def _link_shared_data():
    "Point `FASTAI_HOME` at a folder whose `data/` links to `../shared/data`, so `untar_data` finds it offline."
    if os.environ.get('FASTAI_HOME') or not SHARED_DATA.is_dir(): return
    home = Path(tempfile.mkdtemp(prefix='fastfold-fastai-home-'))
    (home/'data').mkdir()
    for d in SHARED_DATA.iterdir():
        if d.is_dir(): (home/'data'/d.name).symlink_to(d.resolve())
    os.environ['FASTAI_HOME'] = str(home)

_link_shared_data()
