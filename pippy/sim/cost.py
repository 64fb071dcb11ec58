"""Cost model for the simulator: per-stage F/I/W times, activation and message sizes, P2P cost.

Conventions (the simulator and the runtime agree on them):

* Times are seconds per micro-batch; sizes are bytes per micro-batch.
* A full backward ``B`` costs ``fused_b`` when measured, else ``I + W`` (one autograd pass is
  usually cheaper than the two of a split backward). Schedules with ``B`` run it as one action;
  split schedules run ``I`` and ``W`` separately. A stage whose backward a schedule splits (it
  has an ``I`` action) runs its forwards in ``split_f`` (the forward that records weight-grad
  taps), every other stage in ``f``.
* Memory: the activation of (stage s, micro-batch i) is allocated when ``F(s, i)`` ends. With a
  full backward it is freed when ``B(s, i)`` ends. With the split, what stays from ``I(s, i)`` end
  to ``W(s, i)`` end is ``w_act_bytes`` (default: ``act_bytes``): ``I`` changes the held bytes by
  ``w_act_bytes - act_bytes`` (more when ``W``'s inputs and gradients outweigh what ``I`` frees),
  and ``W`` frees ``w_act_bytes``. ``static_bytes`` (parameters, optimizer state) are always held.
* A message of ``n`` bytes between two ranks arrives ``latency + n / bandwidth`` after it is sent.
  Messages between stages on the same rank are free. Links have no contention.
* ``overhead`` is the runtime's own time per compute action (posting its sends and the next
  receives, bookkeeping): the rank stays occupied that long after each F, B, I or W, and the
  action's outputs leave at the end of it. Bubbles count compute only.

JSON format (``CostModel.to_json`` / ``CostModel.from_json``)::

    {
      "latency": 1e-05,              # seconds per message (default 0)
      "overhead": 2e-04,             # runtime seconds per compute action (default 0)
      "bandwidth": 1e10,             # bytes/second; null or "inf" = infinite (default)
      "microbatches": 8,             # micro-batches the batch was cut into when measured (default 1)
      "stages": [                    # one object per stage; missing keys take the defaults
        {"f": 0.01, "i": 0.01, "w": 0.008, "act_bytes": 2e8, "send_bytes": 4e6,
         "grad_bytes": null, "w_act_bytes": null, "static_bytes": 1e9,
         "fused_b": 0.016, "split_f": 0.011}
      ]
    }

    >>> c = CostModel.uniform(2, f=1, i=1, w=1)
    >>> c.stages[0].b, c.transfer_time(0)
    (2.0, 0.0)
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["CostModel", "StageCost"]


@dataclass(slots=True, kw_only=True)
class StageCost:
    """What one stage costs per micro-batch.

        >>> StageCost(f=1.0, i=2.0, w=0.5).b
        2.5
    """

    f: float = 1.0
    """Forward time in seconds."""
    i: float = 1.0
    """Input-gradient backward time (``I``) in seconds."""
    w: float = 1.0
    """Weight-gradient backward time (``W``) in seconds."""
    act_bytes: float = 0.0
    """Activation bytes one micro-batch keeps from the end of ``F`` until its backward frees them."""
    send_bytes: float = 0.0
    """Bytes of the forward output sent to each consumer stage on another rank."""
    grad_bytes: float | None = None
    """Bytes of the gradient of this stage's output, sent back by each consumer on another rank;
    ``None`` means ``send_bytes``."""
    w_act_bytes: float | None = None
    """Bytes still held between ``I`` end and ``W`` end (what ``W`` reads: the weight ops' inputs and
    the gradients ``I`` computed at their outputs); ``None`` means ``act_bytes``. It can exceed
    ``act_bytes``: then ``I`` adds memory rather than freeing it."""
    static_bytes: float = 0.0
    """Bytes the stage always holds (parameters, gradients, optimizer state); added to peak memory."""
    fused_b: float | None = None
    """Time of a full backward ``B`` run as one pass; ``None`` means ``i + w``."""
    split_f: float | None = None
    """Forward time when the schedule splits this stage's backward (weight-grad taps recorded);
    ``None`` means ``f``."""

    @property
    def b(self) -> float:
        """Full backward time: ``fused_b`` if measured, else ``i + w``."""
        return float(self.i + self.w if self.fused_b is None else self.fused_b)

    def forward_time(self, split: bool) -> float:
        """Forward time of a stage whose backward is split (``split_f``) or not (``f``).

            >>> StageCost(f=1.0, split_f=1.25).forward_time(True)
            1.25
        """
        return float(self.split_f if split and self.split_f is not None else self.f)

    @property
    def grad_out_bytes(self) -> float:
        """Bytes of the gradient message (``grad_bytes`` or ``send_bytes``)."""
        return float(self.send_bytes if self.grad_bytes is None else self.grad_bytes)

    @property
    def held_until_w(self) -> float:
        """Bytes freed at ``W`` end for split schedules (``w_act_bytes`` or ``act_bytes``)."""
        return float(self.act_bytes if self.w_act_bytes is None else self.w_act_bytes)

    def scaled(self, factor: float) -> StageCost:
        """A copy with every per-micro-batch time and size multiplied by ``factor``.

            >>> StageCost(f=2.0, act_bytes=10).scaled(0.5).act_bytes
            5.0
        """

        def mul(x: float | None) -> float | None:
            return None if x is None else float(x) * factor

        return replace(
            self,
            f=self.f * factor,
            i=self.i * factor,
            w=self.w * factor,
            act_bytes=self.act_bytes * factor,
            send_bytes=self.send_bytes * factor,
            grad_bytes=mul(self.grad_bytes),
            w_act_bytes=mul(self.w_act_bytes),
            fused_b=mul(self.fused_b),
            split_f=mul(self.split_f),
        )


@dataclass(slots=True, kw_only=True)
class CostModel:
    """Per-stage costs plus the point-to-point link between ranks.

        >>> m = CostModel(stages=[StageCost(f=1, i=1, w=1)], latency=0.5, bandwidth=100.0)
        >>> m.transfer_time(50)
        1.0
    """

    stages: list[StageCost] = field(default_factory=list)
    """One entry per stage, indexed by stage id."""
    latency: float = 0.0
    """Seconds from send to arrival of any cross-rank message, on top of the bytes term."""
    bandwidth: float = math.inf
    """Bytes per second of a rank-to-rank link; ``inf`` makes the bytes term zero."""
    microbatches: int = 1
    """How many micro-batches the global batch was cut into when these costs were measured."""
    overhead: float = 0.0
    """Runtime seconds per compute action besides the compute itself and its waits (posting sends and
    receives, bookkeeping); a profile cannot see it, :func:`pippy.sim.calibrate.calibrate` measures it."""

    def __repr__(self) -> str:
        """Up to 4 stages in full, else the first, the last and a count; link and overhead.

            >>> r = repr(CostModel.uniform(64))
            >>> r[:36], "… 62 more …" in r, r[-57:], len(r) < 500
            ('CostModel(64 stages: StageCost(f=1.0', True, 'latency=0.0, bandwidth=inf, microbatches=1, overhead=0.0)', True)
        """
        st = self.stages if isinstance(self.stages, list) else []
        shown = [repr(c) for c in st] if len(st) <= 4 else [repr(st[0]), f"… {len(st) - 2} more …", repr(st[-1])]
        return (f"CostModel({len(st)} stages: {', '.join(shown)}; latency={self.latency!r}, bandwidth="
                f"{self.bandwidth!r}, microbatches={self.microbatches!r}, overhead={self.overhead!r})")

    @property
    def num_stages(self) -> int:
        """Number of stages described."""
        return len(self.stages)

    def check(self, what: str = "cost model") -> CostModel:
        """``self`` when every number is usable: times and sizes finite and not negative, bandwidth positive,
        ``microbatches`` at least 1; else a ValueError naming the field.

            >>> CostModel.uniform(2, f=-1.0).check()
            Traceback (most recent call last):
            ...
            ValueError: cost model: stage 0: f must be a finite number >= 0, got -1.0
        """
        if not isinstance(self.stages, list) or not all(isinstance(c, StageCost) for c in self.stages):
            raise ValueError(f"{what}: stages must be a list of StageCost, got {self.stages!r}")
        for n, c in enumerate(self.stages):
            for f in fields(StageCost):
                v = getattr(c, f.name)
                if v is not None and not (isinstance(v, numbers.Real) and 0.0 <= float(v) < math.inf):
                    raise ValueError(f"{what}: stage {n}: {f.name} must be a finite number >= 0, got {v!r}")
        for name in ("latency", "overhead"):
            v = getattr(self, name)
            if not (isinstance(v, numbers.Real) and 0.0 <= float(v) < math.inf):
                raise ValueError(f"{what}: {name} must be a finite number of seconds >= 0, got {v!r}")
        if not (isinstance(self.bandwidth, numbers.Real) and self.bandwidth > 0):
            raise ValueError(f"{what}: bandwidth must be a positive number of bytes per second (inf for no bytes "
                             f"term), got {self.bandwidth!r}")
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, numbers.Integral) \
                or self.microbatches < 1:
            raise ValueError(f"{what}: microbatches must be an int >= 1, got {self.microbatches!r}")
        return self

    def transfer_time(self, nbytes: float) -> float:
        """Seconds for a cross-rank message of ``nbytes``: ``latency + nbytes / bandwidth``."""
        if nbytes <= 0 or math.isinf(self.bandwidth):
            return float(self.latency)
        return float(self.latency + nbytes / self.bandwidth)

    @classmethod
    def uniform(
        cls,
        num_stages: int,
        f: float = 1.0,
        i: float = 1.0,
        w: float = 1.0,
        act_bytes: float = 1.0,
        send_bytes: float = 0.0,
        latency: float = 0.0,
        bandwidth: float = math.inf,
    ) -> CostModel:
        """Every stage costs the same (unit-cost mode by default: F=I=W=1, B=2).

            >>> CostModel.uniform(4).num_stages
            4
        """
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        st = [
            StageCost(f=float(f), i=float(i), w=float(w), act_bytes=float(act_bytes), send_bytes=float(send_bytes))
            for _ in range(num_stages)
        ]
        return cls(stages=st, latency=float(latency), bandwidth=float(bandwidth))

    def for_microbatches(self, n: int) -> CostModel:
        """Costs per micro-batch when the same batch is cut into ``n`` micro-batches.

        Times and sizes scale linearly with micro-batch size (``self.microbatches / n``);
        latency, bandwidth and ``static_bytes`` do not.

            >>> CostModel.uniform(1, f=4.0).for_microbatches(4).stages[0].f
            1.0
        """
        if n < 1:
            raise ValueError(f"microbatches must be >= 1, got {n}")
        k = self.microbatches / n
        return replace(self, stages=[s.scaled(k) for s in self.stages], microbatches=n)

    def rebin(self, num_stages: int) -> CostModel:
        """The same model cut into ``num_stages`` equal-depth stages.

        The stages are laid end to end on a depth axis, each old stage one unit long with its
        cost spread evenly. New stage ``j`` takes ``[j, j+1) * old/new`` of that axis; times,
        activation and static bytes add up by overlap; message sizes come from the old stage
        where the new stage ends.

            >>> [s.f for s in CostModel.uniform(2, f=2.0).rebin(4).stages]
            [1.0, 1.0, 1.0, 1.0]
        """
        old = len(self.stages)
        if num_stages < 1 or old < 1:
            raise ValueError(f"cannot rebin {old} stages into {num_stages}")
        if num_stages == old:
            return replace(self, stages=list(self.stages))
        out: list[StageCost] = []
        width = old / num_stages
        measured_b = any(s.fused_b is not None for s in self.stages)
        measured_sf = any(s.split_f is not None for s in self.stages)
        for j in range(num_stages):
            lo, hi = j * width, (j + 1) * width
            acc = {"f": 0.0, "i": 0.0, "w": 0.0, "act_bytes": 0.0, "static_bytes": 0.0, "w_act": 0.0, "b": 0.0, "sf": 0.0}
            for k in range(math.floor(lo), min(old, math.ceil(hi))):
                frac = max(0.0, min(hi, k + 1) - max(lo, k))
                s = self.stages[k]
                acc["f"] += s.f * frac
                acc["i"] += s.i * frac
                acc["w"] += s.w * frac
                acc["act_bytes"] += s.act_bytes * frac
                acc["static_bytes"] += s.static_bytes * frac
                acc["w_act"] += s.held_until_w * frac
                acc["b"] += s.b * frac
                acc["sf"] += s.forward_time(True) * frac
            last = self.stages[min(old - 1, max(0, math.ceil(hi) - 1))]
            out.append(
                StageCost(
                    f=acc["f"],
                    i=acc["i"],
                    w=acc["w"],
                    act_bytes=acc["act_bytes"],
                    send_bytes=last.send_bytes,
                    grad_bytes=last.grad_bytes,
                    w_act_bytes=acc["w_act"],
                    static_bytes=acc["static_bytes"],
                    fused_b=acc["b"] if measured_b else None,
                    split_f=acc["sf"] if measured_sf else None,
                )
            )
        return replace(self, stages=out)

    # ---- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict in the documented format."""
        return {
            "latency": self.latency,
            "bandwidth": None if math.isinf(self.bandwidth) else self.bandwidth,
            "microbatches": self.microbatches,
            "overhead": self.overhead,
            "stages": [asdict(s) for s in self.stages],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        """Build from the documented dict format; unknown keys are an error.

            >>> CostModel.from_dict({"stages": [{"f": 2}], "bandwidth": "inf"}).stages[0].f
            2.0
        """
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
            raise ValueError("cost JSON must be an object with a 'stages' list")
        extra = set(data) - {"latency", "bandwidth", "microbatches", "overhead", "stages"}
        if extra:
            raise ValueError(
                f"unknown cost JSON keys {sorted(extra)}; allowed: latency, bandwidth, microbatches, overhead, stages"
            )
        names = {f.name for f in fields(StageCost)}
        stages: list[StageCost] = []
        for n, raw in enumerate(data["stages"]):
            if not isinstance(raw, dict):
                raise ValueError(f"stage {n}: expected an object, got {type(raw).__name__}")
            bad = set(raw) - names
            if bad:
                raise ValueError(f"stage {n}: unknown keys {sorted(bad)}; allowed: {', '.join(sorted(names))}")
            kw = {k: (None if v is None else _number(v, f"stage {n}: {k}")) for k, v in raw.items()}
            for k in ("f", "i", "w", "act_bytes", "send_bytes", "static_bytes"):
                if kw.get(k, 0.0) is None:
                    raise ValueError(f"stage {n}: {k} may not be null")
            stages.append(StageCost(**kw))  # type: ignore[arg-type]
        bw = data.get("bandwidth")
        mbs = data.get("microbatches", 1)
        if mbs is not None and (isinstance(mbs, bool) or not isinstance(mbs, int | float) or not math.isfinite(mbs)
                                or mbs != int(mbs)):
            raise ValueError(f"cost JSON: microbatches must be an int >= 1, got {mbs!r}")
        return cls(
            stages=stages,
            latency=_number(data.get("latency") or 0.0, "latency"),
            bandwidth=math.inf if bw is None else _number(bw, "bandwidth"),
            microbatches=1 if mbs is None else int(mbs),
            overhead=_number(data.get("overhead") or 0.0, "overhead"),
        ).check("cost JSON")

    def to_json(self, path: str | Path) -> None:
        """Write the model to ``path`` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> CostModel:
        """Read a model written by ``to_json`` (or by hand in the documented format)."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def _number(value: Any, where: str) -> float:
    """``value`` as a float ("inf" allowed), or a ValueError naming ``where``."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"cost JSON: {where} must be a number, got {value!r}") from None
