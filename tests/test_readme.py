"""README.md is rendered from nbs/index.ipynb (Quarto, which nbdev_readme needs, cannot be installed offline).

Regenerate it with `python tests/test_readme.py` after editing the index notebook."""
import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render_readme() -> str:
    "The markdown cells of nbs/index.ipynb, in order, separated by blank lines."
    nb = json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())
    cells = [''.join(c['source']).strip() for c in nb['cells'] if c['cell_type'] == 'markdown']
    note = '<!-- generated from nbs/index.ipynb by `python tests/test_readme.py`: edit the notebook, not this file -->'
    return note + '\n\n' + '\n\n'.join(cells) + '\n'


def _block(marker: str) -> str:
    text = (ROOT / 'README.md').read_text()
    m = re.search(rf'<!-- {marker} -->\s*```bash\n(.*?)\n```', text, re.S)
    assert m, f'README.md has no ```bash block after <!-- {marker} -->'
    return m.group(1).strip()


def test_readme_matches_index_notebook():
    assert (ROOT / 'README.md').read_text() == render_readme(), 'README.md is stale: run `python tests/test_readme.py`'


def test_readme_has_exactly_two_commands_that_make_their_venv():
    for marker in ('main-command', 'test-command'):
        cmd = _block(marker)
        assert '\n' not in cmd, f'the {marker} must be one copy-paste line'
        assert cmd.startswith('python3.11 -m venv .venv && '), cmd
    assert 'nbdev_test' in _block('test-command') and 'pytest' in _block('test-command')


def test_ci_runs_the_readme_test_command():
    out = subprocess.run(['awk', '/<!-- test-command -->/{f=1;next} f&&/^```/{if(b){exit}b=1;next} f&&b',
                          str(ROOT / 'README.md')], capture_output=True, text=True, check=True).stdout.strip()
    assert out == _block('test-command')
    assert "awk '/<!-- test-command -->" in (ROOT / '.ci' / 'run').read_text()


if __name__ == '__main__':
    (ROOT / 'README.md').write_text(render_readme())
    print('wrote', ROOT / 'README.md')
