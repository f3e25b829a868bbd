"""Where the docs notebooks record what their runs measured, for the README and the pages that read it.

The README's tables are read from `nbs/tutorials/results/*.json`, written by the run that measured them. Only a
refresh writes them (`tools/refresh_notebooks.py` sets `FASTFOLD_RECORD_RESULTS=1`): the test command runs the same
notebooks, with the same assertions, and leaves the tracked files as it found them.

This supports the docs and is not part of fastfold's API (the leading underscore keeps Quarto from rendering it).
"""
import json, os, tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent/'results'
ENV = 'FASTFOLD_RECORD_RESULTS'

def recording() -> bool:
    "Is this run a refresh, which records its results?"
    return os.environ.get(ENV) == '1'

def record_results(name:str, data:dict) -> Path|None:
    "Write `data` to `results/<name>.json`, whole or not at all, when `recording()`; the path written, else `None`"
    if not recording(): return None
    RESULTS.mkdir(exist_ok=True)
    dest = RESULTS/f'{name}.json'
    fd,tmp = tempfile.mkstemp(dir=RESULTS, prefix=f'.{name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f: f.write(json.dumps(data, indent=1))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest

def read_results(name:str) -> dict:
    "The results a refresh recorded as `name`"
    return json.loads((RESULTS/f'{name}.json').read_text())
