"""Re-execute the notebooks in `nbs/` top to bottom, `slow` cells included, and save their outputs in place.

The docs site shows the outputs saved in the notebooks and runs nothing, so after changing a notebook's code, run
    python tools/refresh_notebooks.py            # every notebook, then README.md
    python tools/refresh_notebooks.py nbs/02_fold.ipynb ...   # just these
Each notebook runs in its own process with nbdev's own runner (`nbdev.test.test_nb`, as `nbdev-test` does), is saved
only if every cell succeeds, and is then cleaned with `nbdev-clean`'s rules. API notebooks run first, tutorials next
(they record the results the README reads, which only a refresh does), `nbs/index.ipynb` last, then README.md is rendered from it
(`tools/build_readme.py`). `tests/test_saved_outputs.py` checks what was saved.
"""
import os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'

def notebooks() -> list[Path]:
    "Every notebook, in the order they must run: API pages, tutorials, then the index page (it reads the tutorials' results)"
    nbs = [p for p in NBS.rglob('*.ipynb') if not p.name.startswith('_') and '.ipynb_checkpoints' not in p.parts]
    return sorted(nbs, key=lambda p: (p.name == 'index.ipynb', p.parent != NBS, str(p)))

RUN = '''
import sys
from nbdev.config import get_config
from nbdev.test import test_nb
from nbdev.clean import nbdev_clean
fn = sys.argv[1]
ok,secs = test_nb(fn, skip_flags=[], force_flags=get_config().tst_flags.split(), save=True, basepath=sys.argv[2],
                  cell_timeout=get_config().get('cell_timeout', 600))
if ok: nbdev_clean(fname=fn)
sys.exit(0 if ok else 1)
'''

def refresh(nb:Path) -> bool:
    "Run `nb` in a fresh process, save its outputs and clean it; False if a cell failed (the notebook is then left as it was)"
    t = time.time()
    env = {**os.environ, 'FASTFOLD_RECORD_RESULTS': '1'} # a refresh records what the tutorials measured (nbs/tutorials/_results.py)
    res = subprocess.run([sys.executable, '-c', RUN, str(nb), str(ROOT)], cwd=ROOT, env=env)
    print(f'{"saved " if res.returncode == 0 else "FAILED"} {nb.relative_to(ROOT)} ({time.time()-t:.0f} s)', flush=True)
    return res.returncode == 0

if __name__ == '__main__':
    sys.path.insert(0, str(ROOT))
    import conftest   # as the tests do: offline, `FASTAI_HOME` gets a `data/` linked to `../shared/data` (unless it is set)
    todo = [Path(a).resolve() for a in sys.argv[1:]] or notebooks()
    failed = [nb for nb in todo if not refresh(nb)]
    if any(nb.name == 'index.ipynb' for nb in todo) and not failed:
        subprocess.run([sys.executable, str(ROOT/'tools'/'build_readme.py'), '--no-exec'], check=True, cwd=ROOT)
    if failed: sys.exit('failed: ' + ', '.join(str(nb.relative_to(ROOT)) for nb in failed))
