"""The demo's job graph: every job after the jobs it needs, results passed on, bad graphs refused, the same
results with worker processes as in this process."""

import operator

import pytest

from readapt.demoworld.jobs import Job, run_jobs

ORDER = []


def _record(name, *inputs):
    ORDER.append(name)
    return (name, *inputs)


def _graph():
    return [Job("c", _record, ("c",), needs=("b",), inputs=("a",)),  # given before what it needs
            Job("b", _record, ("b",), needs=("a",)),
            Job("a", _record, ("a",)),
            Job("d", _record, ("d",))]


def test_dependency_order_and_inputs_in_process():
    ORDER.clear()
    done = run_jobs(_graph(), workers=1)
    assert ORDER.index("a") < ORDER.index("b") < ORDER.index("c")
    assert done["c"] == ("c", ("a",))  # the result of an input job comes after the job's own args
    assert set(done) == {"a", "b", "c", "d"}


def test_worker_processes_give_the_same_results():
    jobs = [Job("x", operator.add, (2, 3)), Job("y", operator.mul, (4,), inputs=("x",)),
            Job("z", operator.neg, (), inputs=("y",), needs=("x",))]
    assert run_jobs(jobs, workers=2) == {"x": 5, "y": 20, "z": -20}


@pytest.mark.parametrize("jobs, message", [
    ([Job("a", _record, ("a",), needs=("nope",))], "unknown"),
    ([Job("a", _record, ("a",)), Job("a", _record, ("a",))], "repeat"),
    ([Job("a", _record, ("a",), needs=("b",)), Job("b", _record, ("b",), needs=("a",))], "wait on each other"),
])
def test_bad_graphs_are_refused(jobs, message):
    with pytest.raises(ValueError, match=message):
        run_jobs(jobs, workers=1)


def test_a_failing_job_fails_the_run():
    with pytest.raises(ZeroDivisionError):
        run_jobs([Job("x", operator.truediv, (1, 0))], workers=2)


def test_no_bar_when_stderr_is_not_a_terminal(capsys):
    run_jobs(_graph(), workers=1)
    assert capsys.readouterr().err == ""
