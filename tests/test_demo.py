"""`readapt demo --quick` end to end: the files it promises, the results.json schema, every table cell a number
in range, a smoke test that says so, and a warm second run that reuses the cache. Which method wins is
measured by the demo, never asserted here."""

import json
import math

import pytest

from readapt.cli import main
from readapt.demoworld.verdicts import NOT_TESTABLE, VERDICTS


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "out", root / "cache"
    assert main(["demo", "--quick", "-o", str(out), "--cache-dir", str(cache)]) == 0
    return out, cache


def test_output_files(quick_demo):
    out, _ = quick_demo
    for name in ("README.md", "KEY.md", "tables.md", "tables.json", "results.json", "partial_adaptation.png",
                 "instruction_strength.png", "lore_tau.png", "port_drift.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    seed = out / "seed0"
    for name in ("data/qa.jsonl", "data/qa_test.jsonl", "data/knowledge.jsonl", "re_adapter/readapt_delta.json",
                 "lore_adapter_tau0.5/adapter_config.json", "ported_merged/config.json", "results.json"):
        assert (seed / name).is_file(), name
    assert not (seed / "ported_merged" / "training_log.jsonl").exists()  # nothing copied in from the base's run


def test_results_schema(quick_demo):
    out, _ = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert results["demo"] == "readapt" and results["quick"] is True and results["seeds"] == [0]
    for c in results["world_checks"]:
        assert set(c) >= {"name", "value", "threshold", "passed"}, c
        assert isinstance(c["passed"], bool) and c["passed"] == (c["value"] >= c["threshold"])
    names = {c["name"] for c in results["world_checks"]}
    assert results["claims"]
    for c in results["claims"]:
        assert set(c) == {"claim", "paper", "verdict", "evidence", "numbers", "depends_on"}, c
        assert c["verdict"] in VERDICTS and set(c["depends_on"]) <= names
        assert c["verdict"] == NOT_TESTABLE  # a smoke test judges nothing
        assert "smoke test" in c["evidence"]
    readme = (out / "README.md").read_text()
    assert "SMOKE TEST" in readme
    for c in results["claims"]:
        assert c["claim"] in readme


def test_no_temporary_paths_and_every_folder_has_a_key(quick_demo):
    out, _ = quick_demo
    for f in out.rglob("*.json"):
        assert ".tmp" not in f.read_text(), f
    key = (out / "KEY.md").read_text()
    for d in (out / "seed0").iterdir():
        stem = d.name.split("_tau")[0].split("_v2_")[0] if d.is_dir() else d.name
        assert stem in key, d.name
    for d in (out / "seed0" / "eval").iterdir():
        assert d.name.split("_")[0] in key, d.name


def test_every_table_cell_is_in_range(quick_demo):
    out, _ = quick_demo
    tables = json.loads((out / "tables.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in tables.json"))
    assert {"closed_book", "grid_re_adapt_B", "grid_re_adapt_A", "strength", "lore_tau", "lore_ranks", "rag", "port",
            "knowledge", "interference", "memory"} <= set(tables)
    for name, t in tables.items():
        assert t["rows"], name
        for row in t["rows"]:
            assert len(row["mean"]) == len(row["std"]) == len(t["columns"]), (name, row["label"])
            for v in row["mean"]:
                if v is None:  # no value (n/a): only where a column does not apply to a row
                    assert t["unit"] in ("mixed", "ratio"), (name, row)
                    continue
                assert isinstance(v, (int, float)), (name, row)
                if t["unit"] == "%":
                    assert 0 <= v <= 100, (name, row)
                elif t["unit"] == "rank":
                    assert v == int(v) and 0 <= v <= 128, (name, row)
            assert all(s in (0, None) for s in row["std"])  # one seed


def test_summaries_agree_with_the_tables(quick_demo):
    """eval/instruct answers qa_test.jsonl: its summary's mean is the question-weighted mean of the table's B and A."""
    out, _ = quick_demo
    summary = json.loads((out / "seed0" / "eval" / "instruct" / "summary.json").read_text())
    rows = {r["label"]: r["mean"] for r in json.loads((out / "tables.json").read_text())["closed_book"]["rows"]}
    qs = [json.loads(l) for l in (out / "seed0" / "data" / "qa_test.jsonl").read_text().splitlines()]
    n_b = sum(q["id"].startswith("B/") for q in qs)
    b, a = rows["instruct"][1], rows["instruct"][3]
    assert summary["contains_em"] * (100 if summary["contains_em"] <= 1 else 1) == pytest.approx(
        (n_b * b + (len(qs) - n_b) * a) / len(qs), abs=1e-6)


def test_second_run_reuses_the_cache(quick_demo, tmp_path):
    out, cache = quick_demo
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    assert before
    assert main(["demo", "--quick", "-o", str(out), "--cache-dir", str(cache)]) == 0  # replaces its own demo
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == before
    first = json.loads((out / "tables.json").read_text())
    assert main(["demo", "--quick", "-o", str(tmp_path / "again"), "--cache-dir", str(cache)]) == 0
    assert json.loads((tmp_path / "again" / "tables.json").read_text()) == first


def test_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "-o", str(tmp_path / "mine"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "c").exists()  # refused before anything was trained
    assert main(["demo", "--seeds", "0", "-o", str(tmp_path / "x")]) == 2
    assert main(["demo", "--quick", "--capacity-sweep", "-o", str(tmp_path / "y")]) == 2


def test_port_claims_need_a_patch_that_works(quick_demo):
    """The PortLLM claims, at the smallest and at the largest drift, depend on the 'task patch learned'
    check: with it failed they are not testable, with it passed each is judged on its own drift's numbers."""
    from readapt.demoworld.checks import TASK
    from readapt.demoworld.claims import portllm

    out, _ = quick_demo
    per_seed = json.loads((out / "results.json").read_text())["per_seed"]
    two = [per_seed[0], json.loads(json.dumps(per_seed[0]))]
    numbers = {0: ((2.0, 60.0, 61.0), (3.0, 62.0, 60.0)), -1: ((40.0, 10.0, 61.0), (41.0, 12.0, 60.0))}
    for i, by_seed in numbers.items():
        for r, (alone, ported, retrained) in zip(two, by_seed):
            d = r["port"]["drift"][i]
            d["version 2 alone"]["A"]["contains_em"] = alone
            d["version 2 + ported patch"]["A"]["contains_em"] = ported
            d["version 2 + re-trained patch"]["A"]["contains_em"] = retrained
    small_does, small_matches, large_does, large_matches = portllm(two)
    steps = [d["steps"] for d in per_seed[0]["port"]["drift"]]
    assert f"({steps[0]} further" in small_does.claim and f"({steps[-1]} further" in large_does.claim
    assert [c.judge(set())["verdict"] for c in (small_does, small_matches, large_does, large_matches)] == [
        "reproduced", "reproduced", "not reproduced", "not reproduced"]
    assert "weights moved" in small_does.judge(set())["evidence"]
    assert small_does.judge({TASK})["verdict"] == NOT_TESTABLE and TASK in small_does.judge({TASK})["evidence"]
    assert not math.isnan(small_does.judge(set())["numbers"]["difference"])


def test_task_patch_is_trained_as_the_settings_say(quick_demo):
    """The task corpus is closed-book QA (no passage in any prompt) and A's bios; the task patches train with
    the `task_*` settings (rank, alpha, blocks a step, dropout, epochs), the knowledge adapters with `lora_rank`,
    `lora_alpha`, `lora_batch`, one epoch and readapt.train's default dropout."""
    from readapt.demoworld.settings import QUICK

    _, cache = quick_demo
    (root,) = {p.parent.parent for p in cache.rglob("adapters/task_v1")}
    rows = [json.loads(line)["text"] for line in (root / "data" / "task.jsonl").read_text().splitlines()]
    chats = [t for t in rows if "assistant :" in t]
    assert len(chats) == QUICK.task_examples and not any("given this context" in t for t in chats)

    def trained(name):
        folder = root / "adapters" / name
        config = json.loads((folder / "adapter_config.json").read_text())
        log = [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]
        steps = [r for r in log if "tokens" in r]
        return (config["r"], config["lora_alpha"], config["lora_dropout"], steps[0]["tokens"] // QUICK.lora_block,
                round(max(r.get("epoch", 0) for r in log)))

    task = (QUICK.task_rank, QUICK.task_alpha, QUICK.task_dropout, QUICK.task_batch, QUICK.task_epochs)
    for k in ("task_v1", *(f"task_v2_{k}" for k in QUICK.v2_steps)):
        assert trained(k) == task, k
    assert trained("knowledge") == (QUICK.lora_rank, QUICK.lora_alpha, 0.05, QUICK.lora_batch, 1)


def test_port_table_starts_with_the_patch_on_its_own_version(quick_demo):
    """Row 0 of the PortLLM table: Φ alone and Φ + patch (the same mean ± std as every other cell); the title
    carries no seed's number."""
    out, _ = quick_demo
    port = json.loads((out / "tables.json").read_text())["port"]
    seed = json.loads((out / "results.json").read_text())["per_seed"][0]["port"]
    first = port["rows"][0]
    assert first["label"].startswith("0 steps")
    assert first["mean"][3] == seed["version 1 alone"]["A"]["contains_em"]
    assert first["mean"][4] == seed["version 1 + task patch"]["A"]["contains_em"]
    assert first["mean"][5] is None  # nothing re-trained on the patch's own version
    assert [r["label"].split()[0] for r in port["rows"][1:]] == [str(d["steps"]) for d in seed["drift"]]
    assert not any(ch in "0123456789" for ch in port["title"])


def test_heatmaps_frame_the_cell_each_seed_chose():
    """The partial-adaptation figure is a mean over seeds, so it frames every seed's chosen (α, β), counted,
    not one seed's."""
    from readapt.demoworld.figures import chosen_cells

    assert chosen_cells([[0.0, 0.75], [0.5, 1.0], [0.5, 1.0]]) == {(0.0, 0.75): 1, (0.5, 1.0): 2}
    assert chosen_cells([[1.0, 1.0]]) == {(1.0, 1.0): 1}
