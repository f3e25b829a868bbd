"""Test setup shared by `tests/`: the `--quick` switch, offline data for fastai's `untar_data`, and a check that the
test command leaves the tree as it found it (it never records the docs' results: only `tools/refresh_notebooks.py` does)."""
import os, subprocess, tempfile
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
os.environ.pop('FASTFOLD_RECORD_RESULTS', None) # the tests run the docs notebooks, but only a refresh records their results

def _tree_state() -> str|None:
    "What `git status` says of the tree (tracked changes and untracked files), or `None` outside a git checkout"
    try: res = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all'], cwd=ROOT, capture_output=True, text=True)
    except OSError: return None
    return res.stdout if res.returncode == 0 else None

def pytest_sessionstart(session): session.config._tree_before = _tree_state()

def pytest_sessionfinish(session, exitstatus):
    "Fail the run if the tests changed, added or removed files in the tree"
    before,after = getattr(session.config, '_tree_before', None),_tree_state()
    if before is None or after is None or before == after: return
    changed = sorted(set(after.splitlines()) ^ set(before.splitlines()))
    print('\nThe tests changed the tree (git status before and after differ):\n  ' + '\n  '.join(changed[:20]))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
