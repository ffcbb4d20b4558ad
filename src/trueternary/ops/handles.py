"""Integer handles for the modules a ``torch.library`` op works on.

A custom op takes tensors and numbers, not modules: the ternary linear op (``ops.linear``) reaches its weight
(packed trits, scales, the voter) and its integer bias through the handle each was given when it was made. A
copy of a module (``copy.deepcopy``) is given a handle of its own, so that a copied model multiplies by and votes
into its own state, never the original's. Handles are looked up only while their module lives.
"""

from __future__ import annotations

import itertools
import weakref

from torch import nn

_MODULES: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_NEXT = itertools.count()


class HasOpHandle:
    """Mixin of an ``nn.Module`` that custom ops reach by ``self.op_handle``."""

    def _new_op_handle(self) -> None:
        self.op_handle = next(_NEXT)
        _MODULES[self.op_handle] = self

    def __setstate__(self, state) -> None:  # copy.deepcopy / copy.copy: the copy gets its own handle
        super().__setstate__(state)
        self._new_op_handle()


def module_of(handle: int) -> nn.Module | None:
    """The live module with ``handle`` (-1: None)."""
    if handle < 0:
        return None
    try:
        return _MODULES[handle]
    except KeyError:
        raise RuntimeError(f"no live module has op handle {handle}") from None
