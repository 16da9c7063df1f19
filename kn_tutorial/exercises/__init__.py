"""Check functions for the chapters' exercises, one module per chapter, on one harness.

Each `check_*` runs the student's function through `harness.call` (weights and inputs
snapshotted and restored, a time limit, the package's own solution disabled), on several
cases including one the chapter never shows, and compares with a reference. An unfinished
stub (raising NotImplementedError) only prints a reminder and the check returns None (so the
notebook shows the reminder alone), so
a chapter still runs from top to bottom before its exercises are done. A wrong answer
raises `harness.ExerciseError` (an AssertionError) whose message says what differs.
"""

TODO = ("Not implemented yet: fill in the stub above, then run this cell again until the check "
        "prints 'Correct'.")


def run_stub(fn, *args):
    """fn(*args), or None after printing a reminder when fn is still an unfinished stub
    (kept for old notebooks; the checks use harness.call)."""
    try:
        return fn(*args)
    except NotImplementedError:
        print(TODO)
        return None
