"""Checks of output paths made before any work, so that a bad path costs seconds, not a quantization.

What is checked, for an output directory (``--out``), a work directory (``--workdir``) and an
output file (``--json``):

- the path is of the right kind where it exists (a directory is not a file and the reverse);
- the nearest existing ancestor is a directory in which a file can really be created (a probe file
  is made and removed: permission bits alone say nothing for root or on a read-only mount);
- its filesystem has at least a lower estimate of the bytes the run will write (``need``): a refusal
  means the run would certainly fail, never that it might;
- an output directory is not the model directory, does not contain it and is not inside it (a
  ``--force`` replace would delete the reference), and is neither the working directory nor one of
  its ancestors (it cannot be renamed away from under the process).

Nothing is created or changed by these checks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError, SlqError


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _existing_ancestor(p: Path) -> Path:
    a = p
    while not a.exists() and a != a.parent:
        a = a.parent
    return a


def _within(a: Path, b: Path) -> bool:
    """a is b or lies inside b."""
    return a == b or b in a.parents


def check_writable_dir(path: str | os.PathLike, what: str, need: int = 0) -> None:
    """``path`` is, or can be created as, a directory that accepts files, with ``need`` bytes free."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise SlqError(f"{what} {p} is a file, not a directory")
    _probe(p, what, need)


def check_writable_file(path: str | os.PathLike, what: str, need: int = 0) -> None:
    """``path`` is, or can be created as, a regular file (its directory accepts files)."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise SlqError(f"{what} {p} is a directory, not a file")
    _probe(p.parent, what, need, shown=p)


def _probe(d: Path, what: str, need: int, shown: Path | None = None) -> None:
    shown = shown or d
    a = _existing_ancestor(d)
    if not a.is_dir():
        raise SlqError(f"{what} {shown} cannot be created: {a} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".slq-probe-", dir=a)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SlqError(f"{what} {shown} is not writable: {e.strerror or e} ({a})") from e
    if need > 0:
        free = shutil.disk_usage(a).free
        if free < need:
            raise SlqError(f"{what} {shown}: only {_human(free)} free on its filesystem, at least {_human(need)} "
                           "needed")


def check_out_dir(out: str | os.PathLike, model: str | os.PathLike | None, *, force: bool, need: int = 0) -> None:
    """An output checkpoint directory that can be written without destroying the input or the cwd."""
    o = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, o):
        raise ConfigError("out", f"{{field}} {out} is the working directory or contains it; choose a new directory")
    if model is not None and str(model) != "":
        m = Path(model).expanduser()
        if m.is_file() or (m / "config.json").is_file():  # a model (not yet a bad source: that fails later)
            m = m.resolve()
            md = m if m.is_dir() else m.parent
            if _within(o, md) or _within(md, o):
                raise ConfigError("out", f"{{field}} {out} is the model directory {md}, contains it or lies inside it: the "
                               "reference would be lost; choose another --out")
    if o.exists() and not o.is_dir():
        raise ConfigError("out", f"{{field}} {out} is a file, not a directory")
    if o.exists() and not force:
        raise ConfigError("force", f"output directory {out} exists; pass {{field}} to replace it")
    _probe(o.parent, "--out", need, shown=o)


def weight_bytes(model_dir: str | os.PathLike | None) -> tuple[int, int]:
    """(bytes of the weight files, bytes per parameter) of a local model directory; (0, 2) when unknown."""
    if model_dir is None:
        return 0, 2
    p = Path(model_dir).expanduser()
    if not p.is_dir():
        return 0, 2
    size = sum(f.stat().st_size for f in p.glob("*.safetensors"))
    bpp = 2
    try:
        cfg = json.loads((p / "config.json").read_text())
        if str(cfg.get("dtype") or cfg.get("torch_dtype") or "") in ("float32", "torch.float32"):
            bpp = 4
    except (OSError, ValueError):
        pass
    return size, bpp


def checkpoint_bytes(model_dir, bits: float) -> int:
    """A lower estimate of a checkpoint's size: every parameter at ``bits`` (scales, zeros and the
    tensors kept at full precision come on top)."""
    size, bpp = weight_bytes(model_dir)
    return int(size / bpp * min(bits, 8 * bpp) / 8)


def _held_bytes(workdir) -> int:
    """Bytes of the files ``workdir`` already holds (a partial bank being resumed counts as written)."""
    if workdir is None or not Path(workdir).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(workdir).rglob("*") if f.is_file())


def bank_bytes(model_dir, bitwidths, workdir=None) -> int:
    """A lower estimate of what a bank still has to write, from the weight files alone (before the model is
    read): every parameter once at each quantized bitwidth at one group size, less what ``workdir`` already
    holds (a resumed bank). With several group sizes it still counts one: the choices at the config's own
    group size are the ones pruning never removes, so this stays a lower bound whatever pruning keeps. The
    exact figure, scales and zero points included, is checked by :func:`check_bank_space` once the units
    are known."""
    size, bpp = weight_bytes(model_dir)
    return max(0, int(size / bpp * sum(b for b in bitwidths if b < 16) / 8) - _held_bytes(workdir))


def check_bank_space(workdir: str | os.PathLike, sure: int, most: int | None = None) -> None:
    """Refuse, with one :class:`ConfigError` naming ``workdir``, a bank whose filesystem cannot hold the
    ``sure`` bytes it will certainly write (less what the directory already holds); ``most`` (every choice
    before pruning) is named in the message when it is larger."""
    p = Path(workdir).expanduser().absolute()
    a = _existing_ancestor(p)
    if not a.is_dir():
        raise ConfigError("workdir", f"{{field}} {p} cannot be created: {a} is a file")
    need = max(0, int(sure) - _held_bytes(p))
    free = shutil.disk_usage(a).free
    if need > free:
        upto = f", up to {_human(most)} before pruning" if most is not None and most > sure else ""
        raise ConfigError("workdir", f"{{field}} {p}: the bank needs at least {_human(need)} more{upto}, only "
                          f"{_human(free)} free on its filesystem; free space or choose another {{field}}")
