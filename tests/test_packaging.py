"The package builds as a wheel with every exported module and its console scripts."
import subprocess
import sys
import zipfile
from configparser import ConfigParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_modules_and_entry_points(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                        '-w', str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel, = tmp_path.glob('deepfake_course-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / 'deepfake_course').rglob('*.py')}
    assert modules <= set(names), sorted(modules - set(names))
    entry_points = next(n for n in names if n.endswith('entry_points.txt'))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    cfg = ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini')
    for script in cfg['DEFAULT']['console_scripts'].split():
        name, target = script.split('=')
        assert f'{name} = {target}' in text
        module, func = target.split(':')
        assert (ROOT / (module.replace('.', '/') + '.py')).is_file(), f'{name} points to a missing module {module}'
