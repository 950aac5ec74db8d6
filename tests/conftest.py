"""Shared fixtures and process settings of the test suite: offline Hugging Face lookups, one torch thread,
and `real_models`, the real-checkpoint cache of benchmarks/real_models.py. Helpers that build tiny
checkpoints are in tests/tiny.py (`from tests.tiny import save_tiny`)."""

import os
from pathlib import Path

# never touch the network or the user's real cache from the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# the models here are tiny: one thread is faster than two fighting over a loaded 2-core machine
torch.set_num_threads(1)

import pytest  # noqa: E402

BUILD = "python benchmarks/real_models.py"


class RealModels:
    """The real-model cache of benchmarks/real_models.py: `real_models["gemma-3-270m"]` is that folder,
    or skips the test saying what is missing and how to build it."""

    def __init__(self, root: Path, why: str = ""):
        self.root, self.why = root, why

    def __getitem__(self, name: str) -> Path:
        folder = self.root / name
        if not folder.is_dir():
            pytest.skip(f"real checkpoint {folder} is not built{self.why}; build the cache with `{BUILD}` "
                        f"(2.2 GB, once per machine; $READAPT_REAL_CACHE moves it) or set READAPT_REAL_BUILD=1")
        return folder


@pytest.fixture(scope="session")
def real_models() -> RealModels:
    """The real-model cache ($READAPT_REAL_CACHE or ~/.cache/readapt/real). Builds nothing unless
    READAPT_REAL_BUILD=1; a failed download then skips the real tests with the reason."""
    from benchmarks import real_models as cache  # the repository root is on sys.path: tests is a package

    root, why = cache.default_cache(), ""
    if os.environ.get("READAPT_REAL_BUILD") == "1":
        try:
            cache.build(root)
        except cache.DownloadError as err:
            why = f" (READAPT_REAL_BUILD=1 could not download: {err})"
    return RealModels(root, why)
