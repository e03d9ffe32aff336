import io

from marketplace_classifier.progress import Steps, duration


def test_steps_are_numbered_timed_and_never_claim_fewer_than_were_run():
    stream = io.StringIO()
    steps = Steps("export text", 2, stream)
    steps("tracing")
    steps("measuring")
    steps("one more than announced")
    assert steps.done() >= 0
    lines = stream.getvalue().splitlines()
    assert lines[0] == "export text [1/2] tracing"
    assert lines[1].startswith("export text [2/2] measuring (last step ") and lines[1].endswith(" s)")
    assert lines[2].startswith("export text [3/3] one more than announced")
    assert lines[3].startswith("export text: done in ")


def test_durations_read_as_seconds_then_minutes():
    assert duration(4.25) == "4.2 s"
    assert duration(185) == "3 min 05 s"


def test_soak_says_how_it_goes_each_minute():
    import time

    from marketplace_classifier.benchmarks.soak import Recorder, say_each_minute
    recorder, stream = Recorder(), io.StringIO()
    recorder.add("text", 0.0, 0.1, True)
    recorder.add("image", 0.0, 0.1, False)
    start = time.monotonic()
    say_each_minute(recorder, start, start + 0.05, stream)
    assert stream.getvalue() == "soak [1/1 min] 2 requests, 1 errors so far\n"
