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
