"""Run one of diffusers' example training scripts and record where its time and memory go.

    python benchmarks/peer_run.py RESULT.json SCRIPT.py [script arguments...]

The script runs unchanged in this process (``runpy``); only timers are attached around the
library calls every DreamBooth example makes, so the phases line up with fastsd's:

- ``setup``: process start to the creation of its ``Steps`` progress bar (imports, model load,
  dataset, optimizer, accelerate's prepare);
- ``first_step``: bar creation to the first ``update`` (the scripts read the loss every step, so
  each update follows a synchronised step);
- ``steps``: first to last update, minus the checkpoints taken in between;
- ``checkpoint``: the time inside ``Accelerator.save_state``;
- ``export``: the last update to the end (final save, the LoRA scripts' reload of the pipeline).

Peak VRAM is the whole process's (``torch.cuda.max_memory_allocated/reserved`` at exit; the
scripts never reset the peak). The parent measures the wall time from before this process starts.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

T0 = time.perf_counter()


def main() -> None:
    out_path, script, *args = sys.argv[1:]
    marks: dict[str, float] = {}
    updates: list[float] = []
    saves: list[tuple[float, float]] = []  # (start, seconds)

    import accelerate
    import tqdm.std

    init, update = tqdm.std.tqdm.__init__, tqdm.std.tqdm.update

    def bar_init(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        init(self, *a, **k)
        if k.get("desc") == "Steps":
            self._peer_steps = True
            marks["loop_start"] = time.perf_counter()

    def bar_update(self, n=1):  # noqa: ANN001
        if getattr(self, "_peer_steps", False):
            updates.append(time.perf_counter())
        return update(self, n)

    tqdm.std.tqdm.__init__, tqdm.std.tqdm.update = bar_init, bar_update
    save_state = accelerate.Accelerator.save_state

    def timed_save(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        t = time.perf_counter()
        try:
            return save_state(self, *a, **k)
        finally:
            saves.append((t, time.perf_counter() - t))

    accelerate.Accelerator.save_state = timed_save
    if os.environ.get("PEER_NO_CUDNN_SDPA") == "1":
        # the cuDNN attention backward of torch 2.11 gives non-finite FLUX gradients (fastsd turns it off for
        # SD3/FLUX the same way, train/gpuwarm.py); the peer gets the same exclusion, and the record says so
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)
    sys.argv = [script, *args]
    error = None
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            error = f"exit {e.code}"
    except Exception as e:  # noqa: BLE001 - reported in the result, not hidden
        error = f"{type(e).__name__}: {e}"[:500]
    end = time.perf_counter()
    import torch

    res: dict = {"error": error, "steps": len(updates), "wall_in_process_s": round(end - T0, 2)}
    if os.environ.get("PEER_NO_CUDNN_SDPA") == "1":
        res["cudnn_sdpa"] = False
    if updates and "loop_start" in marks:
        ls, last = marks["loop_start"], updates[-1]
        inside = sum(d for t, d in saves if t < last)  # a checkpoint on the last step follows its update
        after = sum(d for t, d in saves if t >= last)
        res.update(
            setup_s=round(ls - T0, 2),
            first_step_s=round(updates[0] - ls, 2),
            steps_s=round(last - updates[0] - inside, 2),
            checkpoint_s=round(inside + after, 2),
            checkpoints=len(saves),
            export_s=round(end - last - after, 2),
        )
        if len(updates) > 1:
            res["it_per_s"] = round((len(updates) - 1) / max(1e-9, res["steps_s"]), 3)
    if torch.cuda.is_available():
        res["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    with open(out_path, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
