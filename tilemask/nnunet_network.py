"""nnU-Net's network on tilemask's axes (:class:`NnUNetNetwork`), built on the workers from what
:mod:`tilemask.nnunet` read from a results folder."""

from __future__ import annotations

import functools

import torch

from .errors import WorkflowError, first_line


class NnUNetNetwork(torch.nn.Module):
    """nnU-Net's network (``network_class_name`` built with ``arch_kwargs``, as ``get_network_from_plans`` builds
    it, deep supervision off), on tilemask's axes: its input's spatial axes permuted to nnU-Net's (network axis
    ``n`` is tilemask's axis ``axes[n]``), its output's back.  The instance is of a subclass of nnU-Net's class,
    so its state_dict is the checkpoint's."""

    def __new__(cls, network_class_name: str, axes: list[int], **kwargs):
        from .imports import import_module

        module_name, _, attribute = network_class_name.rpartition(".")
        try:
            base = getattr(import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as exc:
            package = module_name.split(".")[0]
            hint = f" (install {package.replace('_', '-')} where the workers run)" if module_name else ""
            raise WorkflowError(f"model.args.network_class_name: cannot import {network_class_name!r}: "
                                f"{first_line(exc)}{hint}") from None  # fmt: skip
        if not (isinstance(base, type) and issubclass(base, torch.nn.Module)):
            raise WorkflowError(f"model.args.network_class_name: {network_class_name} is not a torch.nn.Module class")
        return _on_tilemask_axes(base)(axes, **kwargs)


@functools.cache
def _on_tilemask_axes(base: type[torch.nn.Module]) -> type[torch.nn.Module]:
    class Permuted(base):
        def __init__(self, axes, **kwargs):
            super().__init__(**kwargs)
            self.tilemask_axes = tuple(int(a) for a in axes)

        def forward(self, x):
            lead = x.ndim - len(self.tilemask_axes)
            order = (*range(lead), *(lead + a for a in self.tilemask_axes))
            back = (*range(lead), *(lead + order[lead:].index(lead + a) for a in range(len(self.tilemask_axes))))
            return super().forward(x.permute(order)).permute(back)

    Permuted.__name__ = Permuted.__qualname__ = f"{base.__name__}OnTilemaskAxes"
    return Permuted
