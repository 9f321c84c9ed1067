"""Committed outputs must not go stale: nbval (--nbval-lax) re-runs the lessons whose key outputs are
deterministic and compares the cells marked `# NBVAL_CHECK_OUTPUT` with what is committed.

nbdev_clean strips execution counts, and nbval refuses cells that have outputs but no count ("Unrun reference
cell"), so each notebook is copied with its counts renumbered before nbval runs on it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBVAL_NOTEBOOKS = ['00_core.ipynb', '04_metrics.ipynb']


def _numbered_copy(src: Path, dst: Path) -> int:
    nb = json.loads(src.read_text())
    n = 0
    for cell in nb['cells']:
        if cell['cell_type'] != 'code': continue
        n += 1
        cell['execution_count'] = n
        for out in cell.get('outputs', []):
            if 'execution_count' in out: out['execution_count'] = n
    dst.write_text(json.dumps(nb))
    return sum('NBVAL_CHECK_OUTPUT' in ''.join(c['source']) for c in nb['cells'])


@pytest.mark.parametrize('name', NBVAL_NOTEBOOKS)
def test_committed_outputs_still_match(name, tmp_path):
    nb = tmp_path / name
    checked = _numbered_copy(ROOT / 'nbs' / name, nb)
    assert checked > 0, f'{name} marks no cell with # NBVAL_CHECK_OUTPUT'
    env = {**os.environ, 'IN_TEST': '1', 'MPLBACKEND': 'Agg'}
    r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '--nbval-lax',
                        '--nbval-current-env', str(nb)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, f'nbval failed on nbs/{name}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}'
