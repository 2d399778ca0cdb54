"""Counting the nodes of a captured CUDA graph: the GPU's "kernels per decode step".

A decode step captured by :class:`slq.runtime.decode.DecodeEngine` is one ``torch.cuda.CUDAGraph``
(made with ``keep_graph=True``, so its ``cudaGraph_t`` outlives instantiation). Its nodes are the
kernels, memsets and memcpys one replay launches; fusion is visible as fewer kernel nodes. The
count is read through the CUDA driver API (``cuGraphGetNodes``, ``cuGraphNodeGetType``) of
``libcuda.so.1`` by ctypes, so no extra package is needed. ``cudaGraph_t`` and ``CUgraph`` are the
same handle.
"""

from __future__ import annotations

import ctypes
from collections import Counter

__all__ = ["node_counts"]

# CUgraphNodeType values (cuda.h)
_NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty", 6: "wait_event",
               7: "event_record", 8: "ext_semas_signal", 9: "ext_semas_wait", 10: "mem_alloc", 11: "mem_free",
               12: "batch_mem_op", 13: "conditional"}


def node_counts(graph) -> dict:
    """``{"total": n, "kernel": k, ...}`` for a ``torch.cuda.CUDAGraph`` made with ``keep_graph=True``."""
    lib = ctypes.CDLL("libcuda.so.1")
    handle = ctypes.c_void_p(graph.raw_cuda_graph())
    n = ctypes.c_size_t(0)
    rc = lib.cuGraphGetNodes(handle, None, ctypes.byref(n))
    if rc != 0:
        raise RuntimeError(f"cuGraphGetNodes failed with CUresult {rc}")
    nodes = (ctypes.c_void_p * n.value)()
    rc = lib.cuGraphGetNodes(handle, nodes, ctypes.byref(n))
    if rc != 0:
        raise RuntimeError(f"cuGraphGetNodes failed with CUresult {rc}")
    kinds: Counter[str] = Counter()
    t = ctypes.c_int(0)
    for i in range(n.value):
        if lib.cuGraphNodeGetType(ctypes.c_void_p(nodes[i]), ctypes.byref(t)) == 0:
            kinds[_NODE_TYPES.get(t.value, f"type{t.value}")] += 1
    return {"total": int(n.value), **dict(kinds)}
