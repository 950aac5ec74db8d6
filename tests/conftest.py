import os
import sys
from pathlib import Path

# tests import the helpers in tests/tiny.py as `from tiny import ...`
sys.path.insert(0, str(Path(__file__).parent))
# never touch the network or the user's real cache from the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
