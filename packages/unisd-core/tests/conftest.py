import textwrap
from pathlib import Path

import pytest

from unisd.testing import make_tiny_model_dir, toy_records, write_jsonl


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("unisd-cache")


@pytest.fixture(autouse=True)
def private_cache(session_cache, monkeypatch) -> Path:
    """Caches (data-file indexes, ...) go to a folder of this test session, never the user's."""
    monkeypatch.setenv("UNISD_CACHE_DIR", str(session_cache))
    return session_cache


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2", pad_is_eos=False)


@pytest.fixture
def toy_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", toy_records(8))


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Install a fake third-party distribution (module + *.dist-info) on sys.path."""

    def make(dist: str, ep_name: str, module: str, source: str) -> None:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[unisd]\n{ep_name} = {module}\n")
        monkeypatch.syspath_prepend(str(site))

    return make
