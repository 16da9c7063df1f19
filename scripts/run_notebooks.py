"""Run the chapter notebooks end to end with nbclient, time each one, and say where they ran.

Used by scripts/gpu_suite.sh for the one-shot GPU run (no pytest/nbval there), and usable
anywhere Jupyter's nbclient and ipykernel are installed:

    python scripts/run_notebooks.py                          # every book/0*.ipynb
    python scripts/run_notebooks.py book/05_causal_tracing.ipynb --out /tmp/run

Like nbval it skips cells tagged `nbval-skip` (they need a model or hardware the run lacks;
`--run-skipped` runs them too) and runs each kernel in book/. After the last cell it asks
the kernel where `model` lives (device, dtype), which model it is, and the peak CUDA
memory, so a GPU run proves it really used the GPU. The summary (versions, then one line
per notebook, appended as soon as it finishes, so a run cut short still reports) goes to
OUT/summary.txt (or --summary); the executed notebooks land in OUT/executed/. With
--jobs N, N notebooks run at once (each time is then measured under that load).
Exit status 1 if any notebook failed (or, with --require-cuda, ran its model off CUDA).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from queue import Empty

ROOT = Path(__file__).resolve().parents[1]
MARK = "KN_SUITE_REPORT "
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Appended to every notebook: where did the chapter's model run?
REPORT_CELL = f"""
import json as _json, sys as _sys
_model = globals().get("model")
_torch = _sys.modules.get("torch")
_params = next(_model.parameters()) if hasattr(_model, "parameters") else None
_cuda = _torch is not None and _torch.cuda.is_available()
print({MARK!r} + _json.dumps({{
    "model": globals().get("MODEL_NAME"),
    "device": str(_params.device) if _params is not None else None,
    "dtype": str(_params.dtype) if _params is not None else None,
    "cuda_peak_gb": round(_torch.cuda.max_memory_allocated() / 1e9, 3) if _cuda else None,
    "gpu": _torch.cuda.get_device_name(0) if _cuda else None,
    "kn_tutorial": getattr(_sys.modules.get("kn_tutorial"), "__file__", None),
}}))
"""


def poll_shell_in_steps(kernel_client, step: float = 0.5) -> None:
    """Make the kernel client wait for shell replies in polls of at most `step` seconds.

    nbclient waits for a cell's execute_reply with one poll on the shell socket that lasts the
    whole cell timeout, while its proxy of an ipywidgets Output widget (interactive_output,
    the explorers) sends comm messages on that same socket. ZeroMQ signals a socket's
    readiness by an edge-triggered descriptor, and the send can consume the edge that the
    reply raised: the poll then never wakes, and the run waits on an idle kernel until the
    timeout (seen here once in a CI run, on chapter 3's explorer; nbclient issue #312). A new
    poll checks the socket's events first, so polling in short steps finds the reply within
    `step` seconds. The timeout as a whole is kept."""
    channel = kernel_client.shell_channel
    get_msg = channel.get_msg

    async def get_msg_in_steps(timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = step if deadline is None else max(0.0, min(step, deadline - time.monotonic()))
            try:
                return await get_msg(timeout=wait)
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg_in_steps


def run_one(path: Path, out_dir: Path, timeout: int, run_skipped: bool) -> dict:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    skipped = 0
    if not run_skipped:
        kept = []
        for cell in nb.cells:
            if cell.cell_type == "code" and "nbval-skip" in cell.metadata.get("tags", []):
                skipped += 1
                continue
            kept.append(cell)
        nb.cells = kept
    nb.cells.append(nbformat.v4.new_code_cell(REPORT_CELL.strip()))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    row = {"notebook": path.name, "skipped_cells": skipped, "status": "ok", "error": ""}
    start = time.perf_counter()
    try:
        with client.setup_kernel():
            poll_shell_in_steps(client.kc)
            try:  # the chapter's cells, stopping at the first error (as nbval does)
                for index, cell in enumerate(nb.cells[:-1]):
                    client.execute_cell(cell, index)
            except (CellExecutionError, CellTimeoutError) as err:
                row["status"] = "FAILED"
                lines = ANSI.sub("", str(err)).strip().splitlines() or ["?"]
                row["error"] = f"cell {index}: {lines[-1]}"[:300]
            row["seconds"] = round(time.perf_counter() - start, 1)
            client.execute_cell(nb.cells[-1], len(nb.cells) - 1)  # where did the model run, even after a failure
    except Exception as err:  # the kernel died, could not start, ...
        row["status"] = "FAILED"
        row["error"] = row["error"] or f"{type(err).__name__}: {err}"[:300]
    row.setdefault("seconds", round(time.perf_counter() - start, 1))
    for output in nb.cells[-1].get("outputs", []):
        text = output.get("text", "")
        if MARK in text:
            row.update(json.loads(text.split(MARK, 1)[1].splitlines()[0]))
    (out_dir / "executed").mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / "executed" / path.name)
    return row


def line(row: dict) -> str:
    where = f"{row.get('device')} {row.get('dtype')}" if row.get("device") else "device unknown"
    peak = f", CUDA peak {row['cuda_peak_gb']} GB" if row.get("cuda_peak_gb") is not None else ""
    skipped = f", {row['skipped_cells']} nbval-skip cells not run" if row["skipped_cells"] else ""
    text = f"{row['notebook']:<32} {row['status']:<6} {row['seconds']:>8.1f} s  model {row.get('model')} on {where}{peak}{skipped}"
    return text + (f"\n    {row['error']}" if row["error"] else "")


def header() -> str:
    import platform

    lines = [f"run_notebooks {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, python {platform.python_version()}"]
    try:
        import torch
        import transformers

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        lines.append(f"torch {torch.__version__}, transformers {transformers.__version__}, {gpu}")
    except ImportError as err:
        lines.append(f"({err})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run chapter notebooks with nbclient and time them.")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every book/0*.ipynb")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "_build" / "notebook_run")))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (nbval's setting)")
    parser.add_argument("--run-skipped", action="store_true", help="also run cells tagged nbval-skip")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run at once (default 1: clean timings)")
    parser.add_argument("--summary", type=Path, help="summary file (default OUT/summary.txt)")
    parser.add_argument("--require-cuda", action="store_true", help="fail a notebook whose model is not on CUDA")
    args = parser.parse_args(argv)

    notebooks = [p.resolve() for p in args.notebooks] or sorted((ROOT / "book").glob("0*.ipynb"))
    # The kernels inherit this environment: the checkout's package, no progress bars.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    os.environ.setdefault("KN_PROGRESS", "0")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = args.summary or args.out / "summary.txt"
    summary.write_text(header() + f"{len(notebooks)} notebooks, {args.jobs} at a time, cell timeout {args.timeout} s\n")
    print(summary.read_text(), end="", flush=True)
    failed = 0
    total = time.perf_counter()
    # spawn, not fork: the parent may have initialised CUDA (header) and must not be copied
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_one, path, args.out, args.timeout, args.run_skipped) for path in notebooks]
        rows = (future.result() for future in as_completed(futures))
        failed = _report(rows, summary, args.require_cuda)
    end = f"total {time.perf_counter() - total:.1f} s for {len(notebooks)} notebooks, {failed} failed"
    print(end)
    with summary.open("a") as f:
        f.write(end + "\n")
    return 1 if failed else 0


def _report(rows, summary: Path, require_cuda: bool) -> int:
    failed = 0
    for row in rows:
        if require_cuda and row["status"] == "ok" and not str(row.get("device", "")).startswith("cuda"):
            row["status"], row["error"] = "FAILED", f"the model ran on {row.get('device')}, not on CUDA"
        failed += row["status"] != "ok"
        print(line(row), flush=True)
        with summary.open("a") as f:
            f.write(line(row) + "\n")
            f.write(json.dumps(row) + "\n")
    return failed


if __name__ == "__main__":
    sys.exit(main())
