"Run every notebook in `nbs/` as a test, each in its own process, the way `nbdev-test` does."
import os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT/'nbs').rglob('*.ipynb')
             if not p.name.startswith('_') and '.ipynb_checkpoints' not in p.parts)
NBDEV_TEST = Path(sys.executable).parent/'nbdev-test'

@pytest.mark.parametrize('nb', NBS, ids=[str(p.relative_to(ROOT/'nbs')) for p in NBS])
def test_notebook(nb, request):
    flags = '' if request.config.getoption('--quick') else 'slow'
    cmd = [str(NBDEV_TEST), str(nb), '--flags', flags, '--n-workers', '0']
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    assert res.returncode == 0, f'{nb.name} failed:\n{res.stdout[-6000:]}\n{res.stderr[-12000:]}'
