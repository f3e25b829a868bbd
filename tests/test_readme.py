"README.md is rendered from nbs/index.ipynb (outputs included): the two must not drift apart."
import json, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
from build_readme import render, NB, README

def test_readme_matches_index_notebook():
    assert README.read_text() == render(json.loads(NB.read_text())), 'README.md is stale: run `python tools/build_readme.py`'

def test_readme_states_the_commands():
    text = README.read_text()
    for cmd in ('pip install -e ".[dev]"', 'fastfold-bench', 'python -m pytest'): assert cmd in text
