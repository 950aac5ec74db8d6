"""Hostile and broken inputs through the command line: every one is refused with one line and
exit status 2, or accepted with a valid output; nothing is left behind and no input changes.

The fuzz test at the end mutates the JSON of a tiny checkpoint and its LoRA adapter (safetensors headers,
config.json, the shard index, adapter_config.json) with hypothesis, derandomized and bounded by
max_examples, and runs `readapt merge` in-process on each mutation.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from readapt.cli import main
from tests.tiny import save_tiny


# --- helpers ---------------------------------------------------------------------------------------------


class Run:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    @property
    def error(self) -> str:
        """The error line; asserts that there is exactly one (besides warnings and transformers' progress
        bars), with no traceback around it."""
        assert "Traceback" not in self.err, self.err
        lines = [l for l in self.err.splitlines() if l.strip() and not l.startswith("readapt: warning:")
                 and not re.search(r"\d+%\|", l)]
        assert self.code == 2 and len(lines) == 1, (self.code, self.err)
        return lines[0]


def cli(*args) -> Run:
    """`readapt ARGS` in-process (the same main() the console script calls); argparse exits are caught."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code
    return Run(code, out.getvalue(), err.getvalue())


def digest(*folders) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(Path(f).rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A sharded tiny base, a LoRA adapter trained on it, a delta, and question/prediction files."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import readapt

    d = tmp_path_factory.mktemp("kit")
    base = save_tiny(d / "base", max_shard_size="10KB")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(d / "adapter")
    tuned = save_tiny(d / "tuned", seed=1)
    delta = readapt.extract(base, tuned, d / "delta")
    (d / "qa.jsonl").write_text(json.dumps({"id": "q", "question": "w1 w2", "answers": ["w3"]}) + "\n")
    (d / "preds.jsonl").write_text(json.dumps({"id": "q", "response": "w3", "answers": ["w3"]}) + "\n")
    (d / "text.jsonl").write_text(json.dumps({"text": " ".join(f"w{i % 50}" for i in range(200))}) + "\n")
    return {"base": base, "tuned": tuned, "adapter": d / "adapter", "delta": delta, "qa": d / "qa.jsonl",
            "preds": d / "preds.jsonl", "text": d / "text.jsonl"}


def copy(kit, tmp_path, *names) -> dict:
    return {n: (shutil.copytree if kit[n].is_dir() else shutil.copyfile)(kit[n], tmp_path / kit[n].name)
            for n in names}


# --- one place for user JSON ----------------------------------------------------------------------------

def _inject(member: bytes):
    """The document (a JSON object, or one JSON line) with `member` added at its end."""
    return lambda doc: doc[:-1] + b", " + member + b"}"


JSON_FAULTS = {  # each applied to the real file (or line), so that nothing else is wrong with it
    "a list": lambda doc: b"[" + doc + b"]", "a string": lambda doc: json.dumps(doc.decode()).encode(),
    "null": lambda doc: b"null", "not JSON": lambda doc: doc.replace(b'"', b"'"),
    "nested too deep": _inject(b'"deep": ' + b"[" * 100_000 + b"]" * 100_000),
    "a number too long": _inject(b'"n": 1' + b"0" * 5000), "out of range": _inject(b'"n": 1e400'),
    "NaN": _inject(b'"n": NaN'), "not UTF-8": _inject(b'"s": "\xff"'),
    "a repeated key": lambda doc: b"{" + _first_member(doc) + b", " + doc.lstrip()[1:],  # its first member twice
}


def _first_member(doc: bytes) -> bytes:
    key, value = next(iter(json.loads(doc).items()))
    return json.dumps({key: value})[1:-1].encode()
JSON_FILES = {  # the file, and the command that reads it
    "config.json": ("base", "config.json", lambda k, o: ("merge", k["base"], "--add", k["adapter"], "-o", o)),
    "index": ("base", "model.safetensors.index.json", lambda k, o: ("merge", k["base"], "--add", k["adapter"], "-o", o)),
    "adapter_config.json": ("adapter", "adapter_config.json",
                            lambda k, o: ("merge", k["base"], "--add", k["adapter"], "-o", o)),
    "readapt_delta.json": ("delta", "readapt_delta.json", lambda k, o: ("merge", k["base"], "--add", k["delta"], "-o", o)),
    "predictions (JSON lines)": ("preds", None, lambda k, o: ("score", k["preds"], "-o", o)),
    "questions (JSON lines)": ("qa", None, lambda k, o: ("eval", k["base"], "--questions", k["qa"], "-o", o)),
}


@pytest.mark.parametrize("fault", JSON_FAULTS)
@pytest.mark.parametrize("which", JSON_FILES)
def test_user_json_faults_are_one_line_errors(kit, tmp_path, which, fault):
    folder, name, command = JSON_FILES[which]
    k = {**kit, **copy(kit, tmp_path, folder)}
    target = k[folder] / name if name else k[folder]
    target.write_bytes(JSON_FAULTS[fault](target.read_bytes().strip()) + b"\n")
    r = cli(*command(k, tmp_path / "out"))
    assert target.name in r.error
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("field, value, message", [
    ("r", 0, "'r' is 0; it must be a positive integer"),
    ("r", True, "'r' is True; it must be a positive integer"),
    ("r", "8", "it must be a positive integer"),
    ("r", None, "has no 'r' field"),
    ("lora_alpha", "x", "'lora_alpha' is 'x'; it must be a finite number"),
    ("rank_pattern", {"q_proj[": 2}, "rank_pattern key 'q_proj[' is not a valid regular expression"),
    ("rank_pattern", {"q_proj": 0}, "(rank_pattern): 'q_proj' is 0; it must be a positive integer"),
    ("alpha_pattern", {"v_proj": "big"}, "(alpha_pattern): 'v_proj' is 'big'; it must be a finite number"),
    ("use_dora", "yes", "'use_dora' is 'yes'; it must be true or false"),
    ("bias", "some", "'bias' is 'some'; it must be one of 'none', 'all', 'lora_only'"),
    ("rank_pattern", [1], "'rank_pattern' is [1]; it must be an object"),
])
def test_adapter_config_fields_checked_when_opened(kit, tmp_path, field, value, message):
    k = {**kit, **copy(kit, tmp_path, "adapter")}
    cfg = json.loads((k["adapter"] / "adapter_config.json").read_text())
    cfg[field] = value
    (k["adapter"] / "adapter_config.json").write_text(json.dumps(cfg))
    error = cli("merge", k["base"], "--add", k["adapter"], "-o", tmp_path / "out").error
    assert message in error and "adapter_config.json" in error


def test_newlines_in_user_text_stay_on_one_line(kit, tmp_path):
    k = {**kit, **copy(kit, tmp_path, "base")}
    index = json.loads((k["base"] / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "shard\nreadapt merge: error: forged.safetensors"
    (k["base"] / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "shard\\nreadapt merge" in cli("merge", k["base"], "--add", kit["adapter"], "-o", tmp_path / "out").error


@pytest.mark.parametrize("command", ["eval", "train", "extract --rank", "compress"])
def test_configs_transformers_cannot_build_are_one_line(kit, tmp_path, command):
    """A config field readapt does not read but transformers checks (here rms_norm_eps: "x")."""
    k = {**kit, **copy(kit, tmp_path, "base", "delta")}
    cfg = json.loads((k["base"] / "config.json").read_text())
    cfg["rms_norm_eps"] = "x"
    (k["base"] / "config.json").write_text(json.dumps(cfg))
    manifest = json.loads((k["delta"] / "readapt_delta.json").read_text())
    manifest["base_config"] = cfg
    (k["delta"] / "readapt_delta.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    args = {"eval": ("eval", k["base"], "--questions", k["qa"], "-o", out),
            "train": ("train", k["base"], "--data", k["text"], "--max-length", "16", "--max-steps", "1", "-o", out),
            "extract --rank": ("extract", k["base"], k["tuned"], "--rank", "2", "-o", out),
            "compress": ("compress", k["delta"], "--rank", "2", "-o", out)}[command]
    error = cli(*args).error
    assert "transformers cannot build the model" in error and "rms_norm_eps" in error and not out.exists()


# --- flags ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (("--max-shard-size", "1.2.3GB"), "cannot read size '1.2.3GB'"),
    (("--max-shard-size", "9" * 400 + "TB"), "cannot read size"),
    (("--max-shard-size", "0"), "cannot read size '0'"),
    (("--dtype", "float8_e4m3fn"), "use float32, bfloat16, float16 or float64"),
    (("--add", ""), "'' names no adapter"),
    (("--add", ":0.5"), "names no adapter"),
])
def test_bad_flags_are_one_line_errors(kit, tmp_path, args, message):
    extra = () if "--add" in args else ("--add", kit["adapter"])
    assert message in cli("merge", kit["base"], *extra, *args, "-o", tmp_path / "out").error
    assert not (tmp_path / "out").exists()


def test_resolve_refuses_an_empty_path(kit, tmp_path, monkeypatch):
    monkeypatch.chdir(kit["base"])  # "" used to mean the current folder: here, a model
    assert "empty path" in cli("merge", "", "--add", kit["adapter"], "-o", tmp_path / "out").error
    assert "empty path" in cli("sweep", kit["base"], "--add", "", "--questions", kit["qa"], "-o", tmp_path / "o").error
    assert "empty output path" in cli("merge", kit["base"], "--add", kit["adapter"], "-o", "", "--overwrite").error


def test_ambiguous_scale_suffix_refused(kit, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(kit["delta"], tmp_path / "d")
    shutil.copytree(kit["delta"], tmp_path / "d:0.5")
    error = cli("merge", kit["base"], "--add", "d:0.5", "-o", tmp_path / "out").error
    assert "'d:0.5' is ambiguous" in error and "'d' with scale 0.5" in error and "'d:0.5:1'" in error
    shutil.rmtree(tmp_path / "d")  # only the folder named d:0.5: that folder, scale 1
    assert cli("merge", kit["base"], "--add", "d:0.5", "-o", tmp_path / "out").code == 0
    assert "d:0.5` | delta | 1 |" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_eval_on_a_missing_gpu_is_one_line(kit, tmp_path):
    error = cli("eval", kit["base"], "--questions", kit["qa"], "--device", "cuda", "-o", tmp_path / "out").error
    assert "--device cuda: no CUDA GPU is visible" in error and not (tmp_path / "out").exists()


def test_hub_lookups_never_touch_the_network(kit, tmp_path, monkeypatch):
    """`eval --tokenizer TYPO` used to spend 51 s in network retries: the command is offline, so it fails
    at once, with one line, without a connection (here: offline mode switched off and any lookup recorded)."""
    import socket

    import huggingface_hub.constants

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError(errno.ENETUNREACH, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # name lookups come first
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    error = cli("eval", kit["base"], "--questions", kit["qa"], "--tokenizer", "no-such-org/TYPO", "-o",
                tmp_path / "out").error
    assert "no-such-org/TYPO" in error and attempts == []


def test_every_hub_lookup_in_the_library_is_local_only():
    """Python callers get no offline switch from the command: each from_pretrained call passes
    local_files_only=True (found in the source, so that a new call without it fails here)."""
    import ast

    import readapt

    missing = []
    for file in Path(readapt.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained" \
                    and getattr(node.func.value, "id", None) in ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"):
                if not any(k.arg == "local_files_only" for k in node.keywords):
                    missing.append(f"{file.name}:{node.lineno}")
    assert missing == []


# --- the operating system -------------------------------------------------------------------------------


def test_full_disk_and_long_names_are_one_line(kit, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(sys.modules["readapt.merging"], "copy_side_files", full)
        error = cli("merge", kit["base"], "--add", kit["adapter"], "-o", tmp_path / "out").error
    assert "No space left on device" in error and "the disk is full" in error
    assert os.listdir(tmp_path) == []
    error = cli("merge", kit["base"], "--add", kit["adapter"], "-o", tmp_path / ("x" * 300)).error
    assert "choose a shorter -o" in error and os.listdir(tmp_path) == []
    assert cli("merge", kit["base"], "--add", kit["adapter"], "-o", tmp_path / ("x" * 255)).code == 0


SIGNAL_SCRIPT = """
import os, signal, sys
from readapt.cli import main

def hang_up(src, dst):  # the job is writing: a partial output exists in the temporary folder
    assert any(p.name.endswith(".safetensors") for p in dst.iterdir())
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))

sys.modules["readapt.merging"].copy_side_files = hang_up
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGQUIT", "SIGTERM"])
def test_hangup_and_quit_clean_up_like_ctrl_c(kit, tmp_path, sig):
    r = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, sig, "merge", str(kit["base"]), "--add",
                        str(kit["adapter"]), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 130 and "interrupted" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []


# --- fuzz -----------------------------------------------------------------------------------------------

LEAVES = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 2**63, 2**64, 10**30])
          | st.floats() | st.text(max_size=8)
          | st.sampled_from(["F32", "BF16", "F8_E4M3", "U16", "", "\ud800", "../victim/model.safetensors",
                             "/etc/passwd", "model-00001-of-00003.safetensors", "adapter_model.safetensors"]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3), max_leaves=6)
TARGETS = ["base header", "base config", "base index", "adapter config", "adapter header"]


def _nodes(doc, path=()):
    """Every (path, node) of a parsed JSON document."""
    yield path, doc
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, child in children:
        yield from _nodes(child, path + (key,))


def _mutate(data, doc):
    """A mutated serialization of `doc` (bytes), as hypothesis draws it."""
    kind = data.draw(st.sampled_from(["replace", "delete", "insert", "repeat", "bytes", "whole"]))
    if kind == "whole":
        return json.dumps(data.draw(VALUES)).encode()
    nodes = list(_nodes(doc))
    path, node = data.draw(st.sampled_from(nodes))
    objects = [(p, n) for p, n in nodes if isinstance(n, dict) and n]
    if kind == "replace" and path:
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = data.draw(VALUES)
    elif kind in ("delete", "repeat") and objects:
        _, obj = data.draw(st.sampled_from(objects))
        key = data.draw(st.sampled_from(sorted(obj)))
        if kind == "delete":
            del obj[key]
        else:  # the same key twice in one object: json.dumps cannot write it, so splice the text
            text = json.dumps(doc)
            member = json.dumps({key: obj[key]})[1:-1]
            at = text.find(member)
            return (text[:at] + json.dumps({key: data.draw(VALUES)})[1:-1] + ", " + text[at:]).encode()
    elif kind == "insert" and objects:
        _, obj = data.draw(st.sampled_from(objects))
        obj[data.draw(st.text(max_size=12))] = data.draw(VALUES)
    raw = json.dumps(doc).encode()
    if kind == "bytes":
        at = data.draw(st.integers(0, len(raw)))
        how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "flip" and at < len(raw):
            raw = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1:]
        elif how == "cut":
            raw = raw[:at]
        else:
            raw = raw[:at] + data.draw(st.binary(max_size=4)) + raw[at:]
    return raw


def _header(file):
    blob = file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def _loads(folder) -> bool:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    try:
        for f in Path(folder).glob("*.safetensors"):
            load_file(f)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        return True
    except Exception:
        return False


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_checkpoint_json(kit, data):
    """For every mutation of one JSON document: exit 0 with an output that safetensors and transformers
    load (unless the mutated base itself does not load: a config.json field readapt does not read, such
    as hidden_act, is copied as it is), or exit 2 with one line and no traceback; no output or temporary
    folder left on failure; the inputs byte-identical; Python's peak memory bounded."""
    target = data.draw(st.sampled_from(TARGETS))
    with tempfile.TemporaryDirectory(prefix="readapt-fuzz-") as tmp:
        tmp = Path(tmp)
        base, adapter = shutil.copytree(kit["base"], tmp / "base"), shutil.copytree(kit["adapter"], tmp / "adapter")
        folder = adapter if target.startswith("adapter") else base
        if target.endswith("header"):
            file = sorted(folder.glob("*.safetensors"))[0]
            doc, payload = _header(file)
            raw = _mutate(data, doc)
            file.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
        else:
            file = folder / {"base config": "config.json", "base index": "model.safetensors.index.json",
                             "adapter config": "adapter_config.json"}[target]
            file.write_bytes(_mutate(data, json.loads(file.read_text())))
        before = digest(base, adapter)
        tracemalloc.start()
        try:
            r = cli("merge", base, "--add", f"{adapter}:0.5", "-o", tmp / "out")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert digest(base, adapter) == before
        assert peak < 200e6, peak
        assert "Traceback" not in r.err, r.err
        if r.code == 0:
            assert _loads(tmp / "out") or not _loads(base), (target, file.read_bytes()[:300])
        else:
            assert r.code == 2 and r.error.startswith("readapt merge: error:")
            assert sorted(os.listdir(tmp)) == ["adapter", "base"]
