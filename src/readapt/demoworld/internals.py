"""The few readapt internals the demo needs beyond the public API, imported in one place so that a move
of any of them changes one line here: JSON lines reading, the validation/test split, the atomic output folder."""

from readapt.checkpoint import output_folder  # noqa: F401
from readapt.evaluation import split_validation  # noqa: F401
from readapt.userfiles import read_jsonl  # noqa: F401
