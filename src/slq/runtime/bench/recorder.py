"""The result JSON of ``slq bench``: device, versions, commit, settings, bandwidth, and rows beside FP16.

Every row is recorded with its roofline: ``roofline_ms = bytes / peak`` and ``pct_roofline = 100 x
roofline_ms / ms``; a row of a quantized backend also gets the FP16 row of the same (kind, layer,
M) as ``fp16_ms`` and ``speedup = fp16_ms / ms``, so FP16 rows are recorded first. Errors of one
measurement are recorded as one line and the run goes on. The file is rewritten after every step
(atomically), so an interrupted run leaves what it measured.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

import torch

from ...util.jsonio import write_json
from ...util.provenance import git_commit, versions
from .timing import cache_bytes, cpu_name, peak_bandwidth


class Recorder:
    def __init__(self, *, device: torch.device, dtype: torch.dtype, json_out, log):
        self.device, self.dtype = device, dtype
        self.json_out, self.log = json_out, log
        self.cache, self.cache_level = cache_bytes(device)
        self.res: dict = {}
        self._fp16: dict = {}

    def start(self, settings: dict, skipped: list[dict]) -> None:
        """Measure the peak bandwidth and open the result with the device, versions and ``settings``."""
        v = versions()
        for mod in ("triton", "humming"):
            try:
                v[mod] = __import__(mod).__version__
            except Exception:  # noqa: BLE001 - optional, recorded as absent
                v[mod] = None
        dev = {"type": self.device.type, "cache_bytes": self.cache, "cache_level": self.cache_level,
               "torch_threads": torch.get_num_threads()}
        if self.device.type == "cuda":
            p = torch.cuda.get_device_properties(self.device)
            dev.update(name=p.name, sms=p.multi_processor_count, memory_bytes=p.total_memory)
        else:
            dev.update(name=cpu_name(), cpus=os.cpu_count())
        self.log(f"device: {dev['name']} ({self.device.type}); measuring peak bandwidth")
        bw = peak_bandwidth(self.device)
        self.peak = bw["GBps"] * 1e9
        self.res = {
            "kind": "slq-bench",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": dev,
            "versions": v,
            "git_commit": git_commit(),
            "settings": settings,
            "bandwidth": bw,
            "roofline": ("roofline time = bytes of weights streamed (storage format: b + (16 + b)/G bits per weight "
                         "quantized, 16 FP16; decode adds the fp16 lm_head and the KV cache read at the mean context) "
                         "/ the measured peak bandwidth; pct_roofline = 100 x roofline time / measured time"),
            "rotation": f"layer rows: R weight copies with R x bytes >= 2 x {self.cache_level} ({self.cache} bytes)",
            "skipped": list(skipped),
            "errors": [],
            "plans": {},
            "rows": [],
        }
        for s in skipped:
            self.log(f"skipped {s['backend']}: {s['reason']}")
        self.save()

    def save(self) -> None:
        if self.json_out is not None:
            write_json(self.json_out, self.res)

    def row(self, **r) -> dict:
        t = r["ms"]
        if r.get("bytes") is not None:
            r["roofline_ms"] = r["bytes"] / self.peak * 1e3
            r["pct_roofline"] = 100 * r["roofline_ms"] / t
            r["GBps"] = r["bytes"] / t / 1e6
        key = (r["kind"], r.get("layer"), r["M"])
        if r["backend"] == "fp16":
            self._fp16[key] = r
        fp = self._fp16.get(key)
        if fp is not None:
            r["fp16_ms"] = fp["ms"]
            r["speedup"] = fp["ms"] / t
            if "tokens_per_s" in r:
                r["fp16_tokens_per_s"] = fp["tokens_per_s"]
        self.res["rows"].append(r)
        return r

    def error(self, what: str, exc: BaseException) -> None:
        msg = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
        self.res["errors"].append(msg)
        self.log(f"error (recorded): {msg}")
