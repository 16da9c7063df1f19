"""One harness for every exercise check: run the student's function so that it cannot fool
the check, and turn what it returns into a tensor or one sentence saying what is wrong.

    got = call(my_fn, W, C, k, v, model=model, forbid=[rome.rank_one_update], what="my_rank_one_update")
    if got is NOT_DONE:        # the stub still raises NotImplementedError: a reminder was printed
        return None
    got = tensor_result(got, (d_model, d_ff), "my_rank_one_update", meaning="Ŵ, [d_model, d_ff]")
    close(got, want, "seed 0", hint=...)

`call` guards four things, and on each failure raises `ExerciseError` (an AssertionError)
with one sentence naming the problem and the fix:

* weights: the model's parameters and every tensor argument are snapshotted; if the function
  changed them, they are restored bit for bit (the check says so) and the check fails;
* hooks: kn_tutorial hooks the function left installed are removed;
* time: an endless loop is stopped after `timeout` seconds (SIGALRM on the main thread; on
  another thread the check stops waiting and says the function is still running);
* the package's own solution: every function in `forbid` (and every module in
  `forbid_modules`) raises while the student's function runs, so a student who calls
  `kn_tutorial.rome.rank_one_update` is told to write it.

Tolerances follow the dtype (`tolerance`): relative to the largest reference value, 1e-9 in
float64, 2e-5 in float32, 1e-2 in 16-bit floats.
"""
from __future__ import annotations

import inspect
import signal
import threading
from typing import Any, Callable, Iterable, Sequence

import torch

from . import TODO

NOT_DONE = object()  # what `call` returns when the stub still raises NotImplementedError

TIME_LIMIT = 60.0  # seconds a student's function may run in one call (tests lower it)

RTOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


class ExerciseError(AssertionError):
    """A check failed; the message says what differs and how to fix it."""


class UsedPackageSolution(Exception):
    """Raised by a package function that the current exercise asks the student to write."""


class _TimeUp(BaseException):  # BaseException: a student's `except Exception` cannot swallow it
    pass


# ---- the package's own solution, disabled while the student's function runs -----------------

def _forbidden(*args, **kwargs):  # its code replaces a forbidden function's code during a call
    import sys as _sys

    from kn_tutorial.exercises.harness import UsedPackageSolution as _Used
    frame = _sys._getframe()
    name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
    raise _Used(f"{frame.f_globals.get('__name__', '?')}.{name}")


class _Forbid:
    """Swap the code of each function in `functions` (unwrapped from decorators) for one that
    raises UsedPackageSolution, so any reference to it, however imported, is caught."""

    def __init__(self, functions: Iterable[Callable]):
        self.functions = []
        for fn in functions:
            inner = inspect.unwrap(fn)
            if not inspect.isfunction(inner) or inner.__code__.co_freevars:
                raise TypeError(f"cannot forbid {fn!r}: not a plain function")
            self.functions.append(inner)
        self.saved: list = []

    def __enter__(self):
        for fn in self.functions:
            self.saved.append((fn, fn.__code__))
            names = {"co_name": fn.__code__.co_name}
            if hasattr(fn.__code__, "co_qualname"):  # Python 3.11+
                names["co_qualname"] = fn.__code__.co_qualname
            fn.__code__ = _forbidden.__code__.replace(**names)
        return self

    def __exit__(self, *exc):
        for fn, code in self.saved:
            fn.__code__ = code
        self.saved.clear()


class _ForbidModules:
    """Make calling any of `modules` (e.g. the MLP whose output the student computes) raise."""

    def __init__(self, modules: Iterable[torch.nn.Module], name: str):
        self.modules, self.name, self.handles = list(modules), name, []

    def __enter__(self):
        def refuse(module, args):
            raise UsedPackageSolution(self.name)

        self.handles = [m.register_forward_pre_hook(refuse) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []


# ---- time limit ------------------------------------------------------------------------------

def _with_time_limit(fn: Callable[[], Any], timeout: float, what: str):
    message = (f"{what} did not finish within {timeout:.0f} s and was stopped: look for a loop whose "
               f"condition never changes (or a much slower method than the exercise asks for).")
    on_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if on_main:
        def alarm(signum, frame):
            raise _TimeUp()

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn()
        except _TimeUp:
            raise ExerciseError(message) from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 (re-raised on the caller's thread)
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ExerciseError(message.replace("was stopped", "is still running in the background (restart the "
                                            "kernel to stop it)"))
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---- running the student's function ----------------------------------------------------------

def _tensor_args(args: Sequence, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    named = [(f"argument {i + 1}", a) for i, a in enumerate(args)] + [(f"argument {k!r}", a) for k, a in kwargs.items()]
    return [(name, a) for name, a in named if isinstance(a, torch.Tensor)]


def call(fn: Callable, *args, model: torch.nn.Module | None = None, forbid: Iterable[Callable] = (),
         forbid_modules: Iterable[torch.nn.Module] = (), forbid_modules_name: str = "the model's own module",
         timeout: float | None = None, what: str | None = None, **kwargs):
    """fn(*args, **kwargs) under the guards above; NOT_DONE (after printing the reminder) while
    fn is an unfinished stub. Raises ExerciseError when fn changed the weights or its tensor
    arguments (both restored first), called a forbidden package function, or ran too long."""
    what = what or f"`{getattr(fn, '__name__', 'your function')}`"
    timeout = TIME_LIMIT if timeout is None else timeout
    inputs = _tensor_args(args, kwargs)
    originals = [t.detach().clone() for _, t in inputs]
    snapshot = None
    if model is not None:
        from ..hooks import count_hooks, remove_hooks
        from ..weights import preserve

        snapshot = preserve(model)
        hooks_before = count_hooks(model)
    error: str | None = None
    try:
        with _Forbid(forbid), _ForbidModules(forbid_modules, forbid_modules_name):
            result = _with_time_limit(lambda: fn(*args, **kwargs), timeout, what)
    except NotImplementedError:
        print(TODO)
        result = NOT_DONE
    except UsedPackageSolution as used:
        error = (f"{what} called `{used}`, the package's own implementation of this exercise: write it "
                 f"yourself from the formula (the package version is the fast one you use after the exercise).")
    finally:
        changed_inputs = []
        for (name, t), o in zip(inputs, originals):
            if not torch.equal(t.detach(), o):
                changed_inputs.append(name)
                with torch.no_grad():
                    t.copy_(o)
        changed = []
        if snapshot is not None:
            changed = snapshot.changed()
            snapshot.restore()
            if count_hooks(model) > hooks_before:
                remove_hooks(model)
    if changed:
        shown = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
        raise ExerciseError(f"{what} changed the model's weights ({shown}); the check restored them bit for bit. "
                            f"Read weights without writing to them (no `+=` or `.copy_` on a weight or its view); "
                            f"work on a copy (`.clone()`) when you need one.")
    if changed_inputs:
        raise ExerciseError(f"{what} changed its input tensor ({', '.join(changed_inputs)}) in place; the check "
                            f"restored it. Return a new tensor instead (`W + update`, not `W += update`).")
    if error:
        raise ExerciseError(error)
    return result


# ---- what the function returned -----------------------------------------------------------------

def tensor_result(got, shape: Sequence[int] | None, what: str, meaning: str = "", dtype=None) -> torch.Tensor:
    """`got` as a tensor (detached, on the CPU) of `shape`, or ExerciseError with one sentence."""
    expected = f"a tensor of shape {tuple(shape)}" if shape is not None else "a tensor"
    expected += f" ({meaning})" if meaning else ""
    if got is None:
        raise ExerciseError(f"{what} returned None: did you forget the `return` statement? Expected {expected}.")
    if isinstance(got, torch.Tensor):
        tensor = got.detach().cpu()
    else:
        try:
            tensor = torch.as_tensor(got)
        except (TypeError, ValueError, RuntimeError):
            raise ExerciseError(f"{what} returned a {type(got).__name__}, expected {expected}.") from None
    if dtype is not None:
        tensor = tensor.to(dtype)
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        hint = ""
        if tensor.dim() == 2 and tuple(tensor.shape[::-1]) == tuple(shape):
            hint = " It is the transpose of what is expected: check which axis is which."
        raise ExerciseError(f"{what} returned shape {tuple(tensor.shape)}, expected {expected}.{hint}")
    return tensor


def number_result(got, what: str, meaning: str = "a number") -> float:
    """`got` as a Python float (a 0-d or one-element tensor is fine), or ExerciseError."""
    if got is None:
        raise ExerciseError(f"{what} returned None: did you forget the `return` statement? Expected {meaning}.")
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            raise ExerciseError(f"{what} returned a tensor of shape {tuple(got.shape)}, expected {meaning} "
                                f"(one number).")
        return float(got.item())
    try:
        return float(got)
    except (TypeError, ValueError):
        raise ExerciseError(f"{what} returned a {type(got).__name__}, expected {meaning}.") from None


def tolerance(*dtypes: torch.dtype) -> float:
    """The relative tolerance for the least precise of `dtypes`."""
    return max(RTOL.get(d, 1e-5) for d in dtypes)


def max_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(largest absolute difference, largest |want|), computed in float64."""
    got, want = got.double(), want.double()
    return (got - want).abs().max().item() if got.numel() else 0.0, want.abs().max().item() if want.numel() else 0.0


def is_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None, factor: float = 1.0) -> bool:
    """|got − want| ≤ rtol · max|want| elementwise, rtol from the dtypes (times `factor`)."""
    if got.shape != want.shape:
        return False
    err, scale = max_error(got, want)
    rtol = factor * tolerance(*(d for d in (got.dtype, want.dtype, dtype) if d is not None))
    return err <= rtol * max(scale, 1e-12)


def close(got: torch.Tensor, want: torch.Tensor, where: str, hint: str = "", dtype=None, factor: float = 1.0) -> None:
    """ExerciseError naming the case, the largest difference and the hint, unless is_close."""
    if not is_close(got, want, dtype, factor):
        err, scale = max_error(got, want)
        raise ExerciseError(f"{where}: your result differs from the reference by up to {err:.3g} (largest "
                            f"reference value {scale:.3g}).{' ' + hint.strip() if hint else ''}")
