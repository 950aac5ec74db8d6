"""The checkpoint layer: the only code in readapt that touches weight files (this face only hands names on).

    header.py    the safetensors format: dtype codes, header parsing and validation
    reader.py    Checkpoint (folder or local hub id, one tensor at a time), ReadOptions, blocks
    writer.py    streaming safetensors writers (shards planned ahead, or one file spooled)
    folders.py   output folders (temporary sibling, lock, rename on success), side files, progress
    configs.py   config.json checks: one architecture or not
    pair.py      Pair(base, tuned): Δ = Θ − Φ, whole or block by block

The block sizes live in reader.py (`reader.BLOCK`, `reader.COPY_BLOCK`): patch them there.
"""

from readapt.checkpoint.configs import CONFIG_FIELDS, check_configs, compare_configs, read_config
from readapt.checkpoint.folders import check_output, copy_side_files, output_folder, progress
from readapt.checkpoint.header import DTYPES, MAX_HEADER, TensorInfo, read_header
from readapt.checkpoint.pair import EXTRACT_FIX, Pair, difference_blocks, shared_tensors
from readapt.checkpoint.reader import (ADAPTER_CONFIG, DELTA_MANIFEST, EXACT_FILE, Checkpoint, ReadOptions,
                                       aligned_blocks, float32_view, hub_repo, is_delta_folder, is_peft_folder,
                                       open_model, read_blocks, read_rows, recorded_name, resolve_model, row_spans,
                                       weight_file)
from readapt.checkpoint.writer import Blocks, Plan, parse_size, shard_plan, write_file, write_tensors

__all__ = ["ADAPTER_CONFIG", "CONFIG_FIELDS", "DELTA_MANIFEST", "DTYPES", "EXACT_FILE", "EXTRACT_FIX", "MAX_HEADER",
           "Blocks", "Checkpoint", "Pair", "Plan", "ReadOptions", "TensorInfo", "aligned_blocks", "check_configs",
           "check_output", "compare_configs", "copy_side_files", "difference_blocks", "float32_view", "hub_repo",
           "is_delta_folder", "is_peft_folder", "open_model", "output_folder", "parse_size", "progress",
           "read_blocks", "read_config", "read_header", "read_rows", "recorded_name", "resolve_model", "row_spans",
           "shard_plan", "shared_tensors", "weight_file", "write_file", "write_tensors"]
