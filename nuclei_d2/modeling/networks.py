"""The network contract of the meta-architectures: what export (ONNX, TorchScript) and exported runtimes plug into.

A model's learned part is a few tensor-in / tensor-out networks; everything around them (tiling, test-time
augmentation, stitching, post-processing) is ordinary code that stays the same whatever runs the networks. A
meta-architecture exposes them with three methods (:class:`ExportableNetworks` implements the last two):

* ``networks() -> dict[str, nn.Module]`` — the networks its inference runs, by stable name ("main"; a two-stage
  U-Net's "stage1" and "stage2"; BRP-Net's "tafe", "refine_small" and "refine_large"), in eval mode. Each module
  carries :class:`NetworkIO` as ``.io``: its input/output names and shapes, which the exporter and the runtimes read.
* ``run_network(name, *inputs)`` — what inference calls instead of the module: the installed runtime's callable for
  that name if there is one, else the eager module.
* ``set_runtime(mapping)`` — install ``{name: callable}`` (tensors in, tensors out: :mod:`nuclei_d2.export.runtime`
  builds them from an export folder), or None for eager PyTorch again.

A model that cannot be exported says why in ``export_unsupported`` (e.g. the classical watershed has no network).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ExportableNetworks", "NetworkIO", "NotExportableError", "network_io"]


class NotExportableError(ValueError):
    """A model (or one of its networks) cannot be exported; the message names the method and why."""


@dataclass(frozen=True)
class NetworkIO:
    """The tensors one network takes and gives, for the exporter (example inputs, dynamic axes) and the sidecar.

    Attributes:
        inputs: input names, in call order.
        outputs: output names, in return order (one output: the module returns a tensor; several: a tuple).
        channels: channels of each ``B x C x H x W`` input.
        out_channels: channels of each output (``B x K x H x W``, at the input's size).
        size_multiple: the inputs' sides must be multiples of this; callers of an exported file pad them (``pad_mode``:
            "reflect", or "replicate" when the pad is not smaller than the side, as :class:`~.unet.UNet` does) and
            crop the outputs back. 1 = any size.
        pad_mode: "reflect", "replicate" or "constant" (zeros).
        fixed_size: ``(H, W)`` when the network takes one size only (BRP-Net's refinement nets), else None (any size).
        dynamic_batch: the batch dimension may vary.
        meaning: one line for the sidecar and the docs: what the outputs are.
        output_dtypes: each output's dtype name for the sidecar (default float32 for all; the R-CNN's classes are
            int64).
        input_shapes, output_shapes: for networks whose tensors are not ``B x C x H x W`` images (detection heads):
            each tensor's shape, ints for fixed dims and names for dynamic ones (exported as dynamic axes); they
            replace the image description built from ``channels`` / ``out_channels``.

    A module may also define ``export_examples() -> (traced_inputs, check_inputs)`` when random normal images are not
    inputs it can be traced or checked with (the exporter then uses those).
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    channels: tuple[int, ...]
    out_channels: tuple[int, ...]
    size_multiple: int = 1
    pad_mode: str = "reflect"
    fixed_size: tuple[int, int] | None = None
    dynamic_batch: bool = True
    meaning: str = ""
    input_shapes: tuple[tuple[int | str, ...], ...] | None = None
    output_shapes: tuple[tuple[int | str, ...], ...] | None = None
    output_dtypes: tuple[str, ...] | None = None

    def shapes(self) -> tuple[list[list[int | str]], list[list[int | str]]]:
        """(input shapes, output shapes), symbolic dims as names."""
        b = "batch" if self.dynamic_batch else 1
        h, w = self.fixed_size if self.fixed_size is not None else ("height", "width")
        ins = [list(s) for s in self.input_shapes] if self.input_shapes is not None else \
            [[b, c, h, w] for c in self.channels]
        outs = [list(s) for s in self.output_shapes] if self.output_shapes is not None else \
            [[b, c, h, w] for c in self.out_channels]
        return ins, outs

    def example_inputs(self, batch: int = 1, size: tuple[int, int] | None = None, seed: int = 0
                       ) -> tuple[torch.Tensor, ...]:
        """Random normal inputs (normalised images look like that) of ``size`` (default: the fixed size, else
        ``4 * size_multiple`` at least 64 px, not square so height and width cannot be swapped unnoticed)."""
        if size is None:
            if self.fixed_size is not None:
                size = self.fixed_size
            else:
                m = max(1, self.size_multiple)
                side = -(-64 // m) * m
                size = (side + m * max(1, 16 // m), side)
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn((batch, c, *size), generator=g) for c in self.channels)

    def to_json(self) -> dict[str, Any]:
        """The sidecar's description of the inputs and outputs (symbolic dims as strings)."""
        ins, outs = self.shapes()
        return {"inputs": [{"name": n, "shape": s, "dtype": "float32"} for n, s in zip(self.inputs, ins, strict=True)],
                "outputs": [{"name": n, "shape": s, "dtype": d} for n, s, d in
                            zip(self.outputs, outs, self.output_dtypes or ("float32",) * len(outs), strict=True)],
                "size_multiple": int(self.size_multiple), "pad_mode": self.pad_mode,
                "fixed_size": list(self.fixed_size) if self.fixed_size is not None else None,
                "dynamic_batch": bool(self.dynamic_batch), "meaning": self.meaning}


def network_io(module: nn.Module, name: str = "") -> NetworkIO:
    """The module's :class:`NetworkIO` (``module.io``), or a clear error."""
    io = getattr(module, "io", None)
    if not isinstance(io, NetworkIO):
        raise NotExportableError(f"network {name or type(module).__name__!r} ({type(module).__name__}) has no "
                                 "NetworkIO in .io: the exporter cannot know its inputs "
                                 "(nuclei_d2/modeling/networks.py)")
    return io


class ExportableNetworks:
    """Mixin for ``nn.Module`` meta-architectures: :meth:`run_network` and :meth:`set_runtime` over the
    :meth:`network_modules` a subclass builds (see the module docstring)."""

    #: Why this model cannot be exported (None: it can).
    export_unsupported: str | None = None

    def network_modules(self) -> dict[str, nn.Module]:
        """The networks as they are (their train/eval mode untouched): what :meth:`run_network` runs eagerly.
        Subclasses build light wrapper modules around their sub-networks here (never registered as children, so the
        checkpoint's keys do not change)."""
        reason = self.export_unsupported or "it does not implement network_modules() (nuclei_d2/modeling/networks.py)"
        raise NotExportableError(f"{type(self).__name__} cannot be exported: {reason}")

    def networks(self) -> dict[str, nn.Module]:
        """The tensor-in / tensor-out networks inference runs, by stable name, in eval mode."""
        if self.export_unsupported:
            raise NotExportableError(f"{type(self).__name__} cannot be exported: {self.export_unsupported}")
        return {name: m.eval() for name, m in self.network_modules().items()}

    @property
    def runtime(self) -> Mapping[str, Callable[..., Any]] | None:
        """The installed ``{name: callable}`` (None: eager PyTorch)."""
        return self.__dict__.get("_network_runtime")

    def set_runtime(self, runtime: Mapping[str, Callable[..., Any]] | None) -> None:
        """Run the named networks through ``runtime``'s callables from now on (None: eager PyTorch again). Names that
        are not networks of this model are an error (a runtime for another model)."""
        if runtime is None:
            self.__dict__.pop("_network_runtime", None)
            return
        known = set(self.network_modules())
        unknown = sorted(set(runtime) - known)
        if unknown:
            raise ValueError(f"{type(self).__name__}: the runtime has networks {unknown} that this model does not have "
                             f"(its networks: {sorted(known)}); was it exported from another model or config?")
        bad = [n for n, fn in runtime.items() if not callable(fn)]
        if bad:
            raise ValueError(f"{type(self).__name__}: runtime entries {bad} are not callable")
        # a plain attribute (not a registered child): never in the state dict, never moved by .to()
        self.__dict__["_network_runtime"] = dict(runtime)

    def run_network(self, name: str, *inputs: torch.Tensor) -> Any:
        """Network ``name`` on ``inputs``: the installed runtime's callable, else the eager module."""
        runtime = self.__dict__.get("_network_runtime")
        if runtime is not None and name in runtime:
            return runtime[name](*inputs)
        modules = self.network_modules()
        if name not in modules:
            raise KeyError(f"{type(self).__name__} has no network {name!r} (it has {sorted(modules)})")
        return modules[name](*inputs)
