"""Two runs taking turns step by step through the lockstep gate."""

import threading
import time

from torchrec_shark.bench.lockstep import StepGate, make_gate


def _run(gate: StepGate, name: str, steps: int, log: list, fail_at: int = -1, start_up: float = 0.0) -> None:
    time.sleep(start_up)
    try:
        for step in range(steps):
            gate.turn()
            if step == fail_at:
                raise RuntimeError("job failed")
            log.append((name, step))
    except RuntimeError:
        gate.leave(wait=False)
        return
    log.append((name, "done"))
    gate.leave()
    log.append((name, "exit"))


def _pair(tmp_path, steps_a: int, steps_b: int, fail_at: int = -1, start_up_b: float = 0.0) -> list:
    make_gate(str(tmp_path), ["a", "b"], 1)
    a = StepGate(str(tmp_path / "a.0"), [str(tmp_path / "b.0")], first=True)
    b = StepGate(str(tmp_path / "b.0"), [str(tmp_path / "a.0")])
    log: list = []
    threads = [threading.Thread(target=_run, args=(b, "b", steps_b, log, fail_at, start_up_b)),
               threading.Thread(target=_run, args=(a, "a", steps_a, log))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a run waits forever"
    return log


def test_runs_alternate_steps_and_exit_together(tmp_path):
    # b starts late: a's first step waits for it; neither exits while the other still steps
    log = _pair(tmp_path, 3, 3, start_up_b=0.3)
    steps = [(n, s) for s in range(3) for n in ("a", "b")]
    assert log[:7] == steps[:5] + [("a", "done"), ("b", 2)]  # a's end (its last eval and save) is its turn
    assert log[7] == ("b", "done") and set(log[8:]) == {("a", "exit"), ("b", "exit")}


def test_a_run_that_ends_early_lets_the_other_go_on(tmp_path):
    log = _pair(tmp_path, 2, 4)
    assert [e for e in log if e[1] not in ("done", "exit")] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("b", 2),
                                                                  ("b", 3)]
    assert log.index(("a", "exit")) > log.index(("b", 3))


def test_a_run_that_fails_lets_the_other_go_on(tmp_path):
    log = _pair(tmp_path, 4, 4, fail_at=1)
    assert [e for e in log if e[1] not in ("done", "exit")] == [("a", 0), ("b", 0), ("a", 1), ("a", 2), ("a", 3)]


def test_a_turn_passes_when_every_rank_of_the_job_has_stepped(tmp_path):
    make_gate(str(tmp_path), ["a", "b"], 2)
    log: list = []
    lock = threading.Lock()

    def rank(role, other, r, first, delay):
        gate = StepGate(str(tmp_path / f"{role}.{r}"), [str(tmp_path / f"{other}.{s}") for s in range(2)], first)
        for step in range(3):
            gate.turn()
            with lock:
                log.append((role, step, "start"))
            time.sleep(delay)  # rank 1 of each job is slower
            with lock:
                log.append((role, step, "end"))
        gate.leave()

    threads = [threading.Thread(target=rank, args=(role, other, r, role == "a", 0.05 * r))
               for role, other in (("a", "b"), ("b", "a")) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    # no rank of one job starts a step while a rank of the other is still in its step
    running = {"a": 0, "b": 0}
    for role, _, what in log:
        running[role] += 1 if what == "start" else -1
        assert not (running["a"] and running["b"]), log
