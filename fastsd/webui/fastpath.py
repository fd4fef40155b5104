"""The denoiser as a CUDA graph: the built-in UI's steps without Python and launch overhead.

A 20-step SD1.5 image calls the UNet 20 times with the same shapes; in eager mode each call
launches ~1,000 kernels from Python, and on a fast GPU the CPU, not the GPU, sets the pace (the
same image took 0.60-0.85 s on an H100, varying with the host's load). :class:`CapturedForward`
replaces the denoiser's ``forward`` on the instance: the first call with a new input signature
(shapes, dtypes, the non-tensor arguments) runs it twice eagerly on a side stream, captures one
call into a CUDA graph, and every later call copies its inputs into the graph's static tensors and
replays it. The kernels are the ones eager mode runs, so images match eager ones to rounding.

Not captured, run eagerly instead: CPU tensors, autograd, ``return_dict=True`` callers, CPU
offload (accelerate moves weights between calls), and anything after a failed capture (said once
in the log). What the graph baked in (LoRA layers and their scales, the weights' addresses) goes
stale when adapters or weights change: :meth:`CapturedForward.reset` drops the graphs, and the
pipeline manager calls it whenever the LoRA set or the model changes.

The trainer's :mod:`fastsd.train.graph` captures a whole training step (forward, backward and
optimizer); this module only ever captures an inference forward.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

log = logging.getLogger(__name__)

#: Input signatures kept captured at once (each holds its activations' memory in a shared pool).
MAX_GRAPHS = 3


class CapturedForward:
    """A module's forward, replayed from CUDA graphs keyed by input signature.

    Args:
        module: the denoiser (a diffusers ``UNet2DConditionModel`` or transformer).
        max_graphs: signatures kept; the least recently used is dropped beyond it.
    """

    def __init__(self, module: Any, max_graphs: int = MAX_GRAPHS) -> None:
        self.module = module
        self.eager = module.forward
        self.max_graphs = max_graphs
        self.graphs: collections.OrderedDict[Any, _Graph] = collections.OrderedDict()
        self.failed: str | None = None
        self.captures = 0
        self.replays = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch
        from torch.utils import _pytree as pytree

        if self.failed or kwargs.get("return_dict", True) or torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = _signature(leaves, spec)
        if key is None:
            return self.eager(*args, **kwargs)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key, leaves, spec)
            if graph is None:
                return self.eager(*args, **kwargs)
        else:
            self.graphs.move_to_end(key)
        for static, value in zip(graph.inputs, leaves, strict=True):
            if isinstance(value, torch.Tensor):
                static.copy_(value)
        graph.graph.replay()
        self.replays += 1
        return pytree.tree_unflatten([t.clone() for t in graph.output_leaves], graph.output_spec)

    def _capture(self, key: Any, leaves: list[Any], spec: Any) -> _Graph | None:
        import torch
        from torch.utils import _pytree as pytree

        from ..cudagraph import capture

        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        static = [v.clone() if isinstance(v, torch.Tensor) else v for v in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        pool = next(iter(self.graphs.values())).graph.pool() if self.graphs else None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # first calls: cuBLAS/cuDNN setup and allocations outside the graph
                    self.eager(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph, out = capture(lambda: self.eager(*args, **kwargs), pool=pool)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager, once, said in the log
            self.failed = f"{type(err).__name__}: {err}"
            self.graphs.clear()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # what the failed capture took goes back before eager runs
            log.warning("denoiser capture failed, running eagerly from now on: %s", self.failed[:300])
            return None
        out_leaves, out_spec = pytree.tree_flatten(out)
        if not all(isinstance(t, torch.Tensor) for t in out_leaves):
            self.failed = "the denoiser returned something other than tensors"
            return None
        made = _Graph(graph, static, out_leaves, out_spec)
        self.graphs[key] = made
        self.captures += 1
        log.debug("captured the denoiser for %s", key[0][:3])
        return made

    def reset(self) -> None:
        """Drop every graph (their memory goes back) and try capturing again."""
        import torch

        had = bool(self.graphs)
        self.graphs.clear()
        self.failed = None
        if had and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


class _Graph:
    def __init__(self, graph: Any, inputs: list[Any], output_leaves: list[Any], output_spec: Any) -> None:
        self.graph, self.inputs, self.output_leaves, self.output_spec = graph, inputs, output_leaves, output_spec


def _signature(leaves: list[Any], spec: Any) -> Any:
    """Hashable key of a call: tensor shapes/dtypes/devices and the other values; None = not capturable."""
    import torch

    parts = []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            if not v.is_cuda:
                return None
            parts.append(("t", tuple(v.shape), v.dtype, v.device.index, v.stride()))
        elif v is None or isinstance(v, (bool, int, float, str)):
            parts.append(("v", v))
        else:
            return None
    return (tuple(parts), str(spec))


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoising network (SD/SDXL ``unet``, SD3/FLUX ``transformer``), or None."""
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def install(pipe: Any) -> CapturedForward | None:
    """Replay ``pipe``'s denoiser from CUDA graphs (idempotent); returns its capturer, or None off CUDA."""
    net = denoiser(pipe)
    if net is None:
        return None
    current = net.__dict__.get("forward")
    if isinstance(current, CapturedForward):
        return current
    try:
        on_cuda = next(net.parameters()).is_cuda
    except StopIteration:
        return None
    if not on_cuda:
        return None
    captured = CapturedForward(net)
    net.forward = captured  # an instance attribute: nn.Module.__call__ finds it before the class's
    return captured


def uninstall(pipe: Any) -> None:
    """Back to the eager forward (before CPU offload, or when the user turns the option off)."""
    net = denoiser(pipe)
    current = net.__dict__.get("forward") if net is not None else None
    if isinstance(current, CapturedForward):
        current.reset()
        del net.forward


def reset(pipe: Any) -> None:
    """Drop captured graphs after the denoiser's weights or adapters changed."""
    net = denoiser(pipe)
    current = net.__dict__.get("forward") if net is not None else None
    if isinstance(current, CapturedForward):
        current.reset()
