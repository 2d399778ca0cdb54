"""Progress off a terminal: plain lines at start, every 10% or 30 s, and finish, with counts and ETA."""

import io
import logging
import re

from slq.util.progress import LogProgress, format_seconds, progress_bar


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_non_terminal_stream_gets_start_step_and_finish_lines():
    out = io.StringIO()  # not a tty
    with progress_bar(True, stream=out) as bar:
        task = bar.add_task("GPTQ layers", total=20)
        for _ in range(20):
            bar.advance(task)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[slq] GPTQ layers: started (0/20 (0%))"
    assert lines[-1].startswith("[slq] GPTQ layers: done 20/20 (100%) in ")
    middle = lines[1:-1]
    # the first item (the stage's time estimate), then one line per 10% crossed: 2/20, 4/20, ..., 18/20
    # (20/20 is the finish line)
    assert [int(re.search(r": (\d+)/20", s).group(1)) for s in middle] == [1] + list(range(2, 20, 2))
    assert all("elapsed" in s and "ETA" in s for s in middle)


def test_eta_is_elapsed_times_remaining_over_done():
    out, clock = io.StringIO(), Clock()
    rep = LogProgress(out, clock=clock, logger=logging.getLogger("slq.test.quiet"))
    task = rep.add_task("windows", total=10)
    clock.t = 8.0
    rep.advance(task, 4)  # 40%: 2 s per item, 6 items left -> 12 s
    assert out.getvalue().splitlines()[-1] == "[slq] windows: 4/10 (40%) elapsed 8.0s, ETA 12.0s"


def test_time_interval_prints_between_steps():
    out, clock = io.StringIO(), Clock()
    rep = LogProgress(out, clock=clock, interval_s=30.0, logger=logging.getLogger("slq.test.quiet"))
    task = rep.add_task("sampling", total=1000)
    for i in range(1, 40):
        clock.t = i * 5.0  # 5 s per item: 1 item is 0.1% of the total, far below a 10% step
        rep.advance(task)
    lines = out.getvalue().splitlines()[1:]
    # the first item's line (the estimate), then a line every 30 s of silence: at t = 30, 60, ..., 180
    assert [re.search(r"elapsed (\S+),", s).group(1) for s in lines] == ["5.0s", "30.0s", "1m00s", "1m30s",
                                                                         "2m00s", "2m30s", "3m00s"]


def test_unfinished_task_gets_a_closing_line_and_no_total_has_no_eta():
    out = io.StringIO()
    with progress_bar(True, stream=out) as bar:
        a = bar.add_task("bank", total=5)
        bar.advance(a, 2)
        b = bar.add_task("tokens")
        bar.update(b, completed=7)
    text = out.getvalue()
    assert "[slq] bank: stopped at 2/5 (40%) after" in text
    assert "[slq] tokens: stopped at 7 after" in text
    assert "ETA" not in "\n".join(s for s in text.splitlines() if "tokens" in s)


def test_disabled_prints_nothing():
    out = io.StringIO()
    with progress_bar(False, stream=out) as bar:
        bar.advance(bar.add_task("x", total=3), 3)
    assert out.getvalue() == ""


def test_lines_go_to_the_slq_logger_when_it_listens():
    out, seen = io.StringIO(), []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger("slq")
    h, old = Keep(level=logging.INFO), log.level
    log.addHandler(h)
    log.setLevel(logging.INFO)
    try:
        with progress_bar(True, stream=out) as bar:
            bar.advance(bar.add_task("eval", total=2), 2)
    finally:
        log.removeHandler(h)
        log.setLevel(old)
    assert seen[0] == "[slq] eval: started (0/2 (0%))" and seen[-1].startswith("[slq] eval: done 2/2")
    assert out.getvalue() == ""  # once, through logging, not twice


def test_format_seconds():
    assert [format_seconds(s) for s in (3.04, 65, 3599.4, 7380)] == ["3.0s", "1m05s", "59m59s", "2h03m"]


def test_first_item_line_estimates_the_stage_from_the_first_item():
    """A 30-layer stage: the line after layer 1 predicts the rest as (seconds of layer 1) x (layers left)."""
    out, clock = io.StringIO(), Clock()
    rep = LogProgress(out, clock=clock, logger=logging.getLogger("slq.test.quiet"))
    task = rep.add_task("GPTQ layers", total=30)
    clock.t = 5.0
    rep.advance(task)
    assert out.getvalue().splitlines()[-1] == "[slq] GPTQ layers: 1/30 (3%) elapsed 5.0s, ETA 2m25s"
    clock.t = 10.0
    rep.advance(task)  # 2/30 crosses no 10% step and 30 s have not passed: no line
    assert len(out.getvalue().splitlines()) == 2
