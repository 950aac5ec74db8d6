import os
import sys
from pathlib import Path

# tests import the helpers in tests/tiny.py as `from tiny import ...`
sys.path.insert(0, str(Path(__file__).parent))
# never touch the network or the user's real cache from the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# the models here are tiny: one thread is faster than two fighting over a loaded 2-core machine
torch.set_num_threads(1)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
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
    sys.path.insert(0, str(REPO / "benchmarks"))
    import real_models as cache

    root, why = cache.default_cache(), ""
    if os.environ.get("READAPT_REAL_BUILD") == "1":
        try:
            cache.build(root)
        except cache.DownloadError as err:
            why = f" (READAPT_REAL_BUILD=1 could not download: {err})"
    return RealModels(root, why)
