"""Execute `nbs/index.ipynb`, keep its outputs, and render it to `README.md`.

`nbdev-readme` needs Quarto, which can't be installed here; this does the same job for the README: every output in
it comes from running the notebook. `tests/test_readme.py` fails when README.md and the notebook disagree.
Usage: python tools/build_readme.py [--no-exec]
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NB, README = ROOT/'nbs'/'index.ipynb', ROOT/'README.md'
HEADER = '<!-- Generated from nbs/index.ipynb by tools/build_readme.py: edit the notebook, not this file -->\n\n'

def _src(cell): return ''.join(cell['source'])

def _hidden(src): return bool(re.search(r'^#\|\s*(hide|include:\s*false)', src, re.M))

def _strip_directives(src): return '\n'.join(l for l in src.split('\n') if not l.startswith('#|')).strip('\n')

def _output_text(o):
    if o.get('output_type') == 'stream': return ''.join(o['text'])
    data = o.get('data', {})
    if 'text/markdown' in data: return ('md', ''.join(data['text/markdown']))
    if 'text/plain' in data: return ''.join(data['text/plain'])
    return ''

def render(nb:dict) -> str:
    "README markdown for the notebook `nb` (as loaded JSON), outputs included"
    parts = []
    for cell in nb['cells']:
        src = _src(cell)
        if cell['cell_type'] == 'markdown': parts.append(src.strip()); continue
        if _hidden(src): continue
        code = _strip_directives(src)
        if code and not re.search(r'^#\|\s*echo:\s*false', src, re.M): parts.append(f'```python\n{code}\n```')
        for o in cell.get('outputs', []):
            t = _output_text(o)
            if isinstance(t, tuple): parts.append(t[1].strip())
            elif t.strip(): parts.append(f'```\n{t.rstrip()}\n```')
    return HEADER + '\n\n'.join(p for p in parts if p) + '\n'

def execute():
    "Run the index notebook in place, saving its outputs (the same runner nbdev-test uses)"
    from nbdev.test import test_nb
    ok,_ = test_nb(NB, skip_flags=[], force_flags=['slow'], save=True, basepath=ROOT)
    if not ok: sys.exit('nbs/index.ipynb failed to run: README.md not written')

if __name__ == '__main__':
    if '--no-exec' not in sys.argv: execute()
    README.write_text(render(json.loads(NB.read_text())))
    print(f'wrote {README.relative_to(ROOT)}')
