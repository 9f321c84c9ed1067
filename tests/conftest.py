import os
import pytest
import torch

os.environ.setdefault('MPLBACKEND', 'Agg')


@pytest.fixture(autouse=True, scope='session')
def _threads():
    "Tests use at most 2 CPU threads (the CI machine has 2 cores)."
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def dfc_home(tmp_path, monkeypatch):
    "An empty cache folder for one test."
    monkeypatch.setenv('DFC_HOME', str(tmp_path / 'dfc_home'))
    return tmp_path / 'dfc_home'
