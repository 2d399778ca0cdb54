"""Counting the operators a piece of code dispatches: the CPU stand-in for "kernels per step".

:class:`OpCounter` is a ``TorchDispatchMode``: every operator call that reaches the dispatcher's
Python key while it is active is counted under its overload name (``aten.mm.default``,
``slq.dequant_linear.default``, ...) and then run unchanged. What it sees:

* an eager step: every ATen op it calls, views included (``aten.view``, ``aten.slice`` cost a
  dispatch and a Python round trip each, though no kernel);
* a custom op (``slq::dequant_linear``): one call; the ops inside its implementation run below
  the mode and are not counted, which is the point of making each linear one op;
* an inductor-compiled step: only what the generated code leaves to the dispatcher (extern
  kernels such as ``mm``, custom ops, fallbacks); the fused loops inductor generates run as plain
  C++/Triton calls and are not dispatched. So the count of a compiled step is the number of
  dispatched calls per step, an upper-bound proxy for what fusion left unfused, not a GPU kernel
  count (the bench reports the CUDA graph's node count for that).

Dynamo refuses to run under a user dispatch mode, so a compiled function is counted from inside:
:func:`counting_backend` wraps a torch.compile backend so that each call of the code it compiled
runs under the counter that :meth:`OpCounter.inside_compiled` made active, if any.

Counts are deterministic for a fixed model, shapes and code path, so tests can pin a budget.
"""

from __future__ import annotations

import contextlib
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "counting_backend"]

_ACTIVE: list["OpCounter"] = []  # the counter that compiled code should run under (innermost last)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: fn()`` then ``c.total``, ``c.counts`` (Counter by op name)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_namespace(self) -> dict[str, int]:
        """Totals per operator namespace (``aten``, ``slq``, ...)."""
        out: Counter[str] = Counter()
        for name, n in self.counts.items():
            out[name.split(".", 1)[0]] += n
        return dict(out)

    @contextlib.contextmanager
    def inside_compiled(self):
        """Count the ops of code compiled through :func:`counting_backend` (use this, not ``with self``,
        around a call of a compiled function: Dynamo does not run under a dispatch mode)."""
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.pop()


def counting_backend(inner: str = "inductor"):
    """A torch.compile backend: ``inner``'s compiled code, run under the active counter, if any."""
    from torch._dynamo import lookup_backend

    compile_inner = lookup_backend(inner)

    def backend(gm, example_inputs):
        fn = compile_inner(gm, example_inputs)
        boxed = getattr(fn, "_boxed_call", False)

        def run(*args):
            if not _ACTIVE:
                return fn(*args)
            with _ACTIVE[-1]:
                return fn(*args)

        run._boxed_call = boxed
        return run

    return backend
