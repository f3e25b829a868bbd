"""The docs site shows the outputs saved in `nbs/` and runs nothing: check what is saved.

No saved output may show a path from the machine that ran it, warning text or a traceback; in the API notebooks
every example cell that displays something must have its output saved (`tools/refresh_notebooks.py` saves them)."""
import ast, copy, json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT/'nbs').rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)
API = [p for p in NBS if p.parent == ROOT/'nbs' and re.match(r'\d\d_', p.name)]

MACHINE_PATH = re.compile(r'(?<![\w.])(/(?:work|tmp|home|root|Users|private|opt|usr|var/folders)/|[A-Za-z]:\\\\Users\\\\)|site-packages|\.venv/')
WARNING = re.compile(r'Warning:|warnings\.warn')
TRACEBACK = re.compile(r'Traceback \(most recent call last\)')

def output_texts(cell) -> list[str]:
    "The text of each output of `cell` (streams, rich data, errors)"
    out = []
    for o in cell.get('outputs', []):
        if o['output_type'] == 'stream': out.append(''.join(o['text']))
        elif o['output_type'] == 'error': out.append('Traceback (most recent call last)\n' + '\n'.join(o.get('traceback', [])))
        else: out += [''.join(v) if isinstance(v, list) else str(v) for k,v in o.get('data', {}).items() if k.startswith('text/')]
    return out

def output_problems(nb:dict) -> list[str]:
    "What a reader must not see in `nb`'s saved outputs"
    probs = []
    for i,cell in enumerate(nb['cells']):
        for t in output_texts(cell):
            for what,pat in (('a machine path', MACHINE_PATH), ('warning text', WARNING), ('a traceback', TRACEBACK)):
                if (m := pat.search(t)): probs.append(f'cell {i} ({cell.get("id")}) shows {what}: ...{t[max(m.start()-40, 0):m.end()+40]!r}...')
    return probs

def _code(src:str) -> str: return '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('#|', '%', '!')))

def displays(src:str) -> bool:
    "Does a cell with source `src` display something: a final bare expression (not a `test_*` call, not ending in `;`), or a `print`/`display`/`show_doc` call?"
    if re.search(r'^#\|\s*(export|exporti|exports|hide)\b', src, re.M): return False
    code = _code(src).rstrip()
    try: tree = ast.parse(code)
    except SyntaxError: return False
    calls = {getattr(n.func, 'id', getattr(n.func, 'attr', None)) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    if calls & {'print', 'display', 'show_doc'}: return True
    last = tree.body[-1] if tree.body else None
    if not isinstance(last, ast.Expr) or code.endswith(';'): return False
    f = last.value.func if isinstance(last.value, ast.Call) else None
    return not (f is not None and getattr(f, 'id', getattr(f, 'attr', '')).startswith('test_'))

def missing_outputs(nb:dict) -> list[str]:
    "Cells of `nb` that display something but have no saved output"
    return [f'cell {i} ({c.get("id")}): {"".join(c["source"])[:70]!r}...' for i,c in enumerate(nb['cells'])
            if c['cell_type'] == 'code' and displays(''.join(c['source'])) and not c.get('outputs')]

@pytest.mark.parametrize('nb', NBS, ids=[str(p.relative_to(ROOT/'nbs')) for p in NBS])
def test_no_machine_paths_warnings_or_tracebacks(nb):
    probs = output_problems(json.loads(nb.read_text()))
    assert not probs, f'{nb.name}: fix the cell and run `python tools/refresh_notebooks.py {nb.relative_to(ROOT)}`:\n' + '\n'.join(probs)

@pytest.mark.parametrize('nb', API, ids=[p.name for p in API])
def test_api_examples_show_their_output(nb):
    miss = missing_outputs(json.loads(nb.read_text()))
    assert not miss, f'{nb.name}: examples saved without their output; run `python tools/refresh_notebooks.py {nb.relative_to(ROOT)}`:\n' + '\n'.join(miss)

# ---- the checks themselves catch what they are for
def _nb(*cells): return {'cells': list(cells)}
def _cell(src, outputs=()): return {'cell_type': 'code', 'id': 'x', 'source': src, 'outputs': list(outputs)}
def _stream(t): return {'output_type': 'stream', 'name': 'stdout', 'text': t}

def test_checks_catch_planted_problems():
    nb = json.loads(API[0].read_text())
    assert output_problems(nb) == []
    for planted,what in [('/work/main/.venv/lib/python3.11/site-packages/torch/jit/_script.py:1491', 'a machine path'),
                         ('/tmp/tmpab12cd/export.pkl', 'a machine path'), ('/home/me/data/x.jpg', 'a machine path'),
                         ('FutureWarning: `torch.jit.script` is deprecated', 'warning text'), ('  warnings.warn(', 'warning text'),
                         ('Traceback (most recent call last):\n  File "x.py"', 'a traceback')]:
        bad = copy.deepcopy(nb)
        bad['cells'].append(_cell('print(1)', [_stream(planted)]))
        [p] = output_problems(bad)
        assert what in p, (planted, p)
    assert output_problems(_nb(_cell('1/0', [{'output_type': 'error', 'ename': 'ZeroDivisionError', 'evalue': '', 'traceback': []}]))) != []
    assert output_problems(_nb(_cell('x', [_stream('resnet18 on work/ and tmp files, 0.5 ms')]))) == [] # no absolute path

def test_display_rule():
    for src in ['folder.report', 'print(x)', 'show_doc(BN_Folder)', 'x = 1\nx', '#| slow\nlearn.fit(1)', 'display(df)']: assert displays(src), src
    for src in ['x = 1', 'test_eq(a, b)', 'fig.savefig(p);', '#| export\ndef f(): pass', '#| hide\nx', 'import torch', 'for i in range(3): f(i)']:
        assert not displays(src), src
    assert missing_outputs(_nb(_cell('folder.report'))) != [] and missing_outputs(_nb(_cell('folder.report', [_stream('x')]))) == []
