"""One progress line for a demo made of several phases: steps done / total over ALL phases and the time left.

A demo declares its phases up front (``Phase``: a name, a number of steps and a prior cost per step
in seconds on an idle 2-core machine). The line shows the phase, its own count, the overall count
and an estimate of the time left: the prior costs of the steps still to run, scaled by how much
slower (or faster) than the prior the steps done so far ran on this machine, at its present load.
So the estimate adapts to a busy machine after the first steps, and steps of very different cost
(a training step, one probe fit) are not counted as equal in the time left.

Log records of the ``ld_ext`` logger are written above the line while it is shown (the line is
redrawn under them). Without a terminal line (``enabled=False``) the start of each phase is logged
with the same counts instead.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["Phase", "DemoProgress", "format_seconds"]


@dataclass(frozen=True)
class Phase:
    name: str
    steps: int
    seconds_per_step: float  # prior cost of one step on an idle 2-core CPU


def format_seconds(s: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class _AboveTheLine(logging.Handler):
    """Hands a record to the wrapped handler with the progress line cleared first and redrawn after."""

    def __init__(self, inner: logging.Handler, write_mode):
        super().__init__(inner.level)
        self.inner = inner
        self._write_mode = write_mode

    def emit(self, record: logging.LogRecord) -> None:
        with self._write_mode():
            self.inner.handle(record)


class DemoProgress:
    """``with DemoProgress(phases) as p: p.start("probe"); p.step(); ...``.

    ``start(name)`` enters a phase (phases may be skipped: their steps then count as done);
    ``step(n=1)`` counts steps of the current phase. ``summary()`` is the line's text (also used
    when the line is not shown)."""

    def __init__(self, phases: list[Phase], enabled: bool = True, clock=time.monotonic):
        if not phases:
            raise ValueError("phases must not be empty")
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be distinct, got {names}")
        for p in phases:
            if isinstance(p.steps, bool) or not isinstance(p.steps, int) or p.steps < 0:
                raise ValueError(f"phase {p.name!r}: steps must be an int >= 0, got {p.steps!r}")
            if not p.seconds_per_step > 0:
                raise ValueError(f"phase {p.name!r}: seconds_per_step must be > 0, got {p.seconds_per_step!r}")
        self.phases = list(phases)
        self.total = sum(p.steps for p in phases)
        self.enabled = enabled
        self._clock = clock
        self._t0 = clock()
        self._index = -1  # current phase
        self._in_phase = 0  # steps done in the current phase
        self._done = 0  # steps done over all phases
        self._prior_done = 0.0  # prior seconds of the steps done (skipped steps not counted)
        self._elapsed_counted = 0.0  # seconds spent on the steps done
        self._last = self._t0
        self._bar = None
        self._swapped: list[tuple[logging.Handler, logging.Handler]] = []

    # ------------------------------------------------------------------ context

    def __enter__(self) -> "DemoProgress":
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{desc} {bar:12} {n_fmt}/{total_fmt} steps{postfix}",
            )
            self._wrap_log_handlers(tqdm.external_write_mode)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        log = logging.getLogger("ld_ext")
        for inner, outer in self._swapped:
            log.removeHandler(outer)
            log.addHandler(inner)
        self._swapped = []

    def _wrap_log_handlers(self, write_mode) -> None:
        log = logging.getLogger("ld_ext")
        for h in list(log.handlers):
            outer = _AboveTheLine(h, lambda: write_mode(file=sys.stderr))
            log.removeHandler(h)
            log.addHandler(outer)
            self._swapped.append((h, outer))

    # ------------------------------------------------------------------ counting

    @property
    def done(self) -> int:
        return self._done

    @property
    def phase(self) -> Phase | None:
        return self.phases[self._index] if self._index >= 0 else None

    def set_steps(self, name: str, steps: int) -> None:
        """Change the step count of a phase not started yet (known only once the data are read)."""
        names = [p.name for p in self.phases]
        if name not in names or names.index(name) <= self._index:
            raise ValueError(f"set_steps: {name!r} is not a phase still to come")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"phase {name!r}: steps must be an int >= 0, got {steps!r}")
        i = names.index(name)
        self.total += steps - self.phases[i].steps
        self.phases[i] = Phase(name, steps, self.phases[i].seconds_per_step)
        if self._bar is not None:
            self._bar.total = self.total
        self._refresh()

    def start(self, name: str) -> None:
        """Enter phase ``name``; the steps of the phases before it that did not run count as done."""
        names = [p.name for p in self.phases]
        if name not in names:
            raise ValueError(f"unknown phase {name!r}; the phases are {names}")
        new = names.index(name)
        if new <= self._index:
            raise ValueError(f"phase {name!r} was already started")
        skipped = sum(p.steps for p in self.phases[self._index + 1 : new])
        if self._index >= 0:
            skipped += self.phase.steps - self._in_phase
        self._advance(skipped, counted=False)
        self._index, self._in_phase = new, 0
        if self._bar is None:
            logger.info("%s", self.summary())
        self._refresh()

    def step(self, n: int = 1) -> None:
        """``n`` steps of the current phase are done (never more than the phase declared)."""
        if self.phase is None:
            raise ValueError("start a phase first")
        n = min(n, self.phase.steps - self._in_phase)
        if n <= 0:
            return
        self._in_phase += n
        self._prior_done += n * self.phase.seconds_per_step
        self._advance(n, counted=True)
        self._refresh()

    def _advance(self, n: int, counted: bool) -> None:
        now = self._clock()
        if counted:
            self._elapsed_counted += now - self._last
        self._last = now
        self._done += n

    # ------------------------------------------------------------------ the estimate

    def seconds_left(self) -> float | None:
        """Prior seconds of the steps still to run x (seconds spent / prior seconds of the steps done);
        None before the first step."""
        if self._prior_done <= 0:
            return None
        speed = self._elapsed_counted / self._prior_done
        left = 0.0
        for i, p in enumerate(self.phases):
            if i < self._index:
                continue
            todo = p.steps - (self._in_phase if i == self._index else 0)
            left += todo * p.seconds_per_step
        return left * speed

    def summary(self) -> str:
        p = self.phase
        where = f"{p.name} {self._in_phase}/{p.steps}" if p is not None else "starting"
        left = self.seconds_left()
        eta = f"about {format_seconds(left)} left" if left is not None else "time left: after the first step"
        return (
            f"demo: {where} | all phases {self._done}/{self.total} steps, "
            f"{format_seconds(self._clock() - self._t0)} elapsed, {eta}"
        )

    def _refresh(self) -> None:
        if self._bar is None or self.phase is None:
            return
        p = self.phase
        self._bar.set_description_str(f"demo [{p.name} {self._in_phase}/{p.steps}]" if p else "demo", refresh=False)
        left = self.seconds_left()
        eta = f"about {format_seconds(left)} left" if left is not None else "time left after the first step"
        self._bar.set_postfix_str(f"{format_seconds(self._clock() - self._t0)} elapsed, {eta}", refresh=False)
        self._bar.n = self._done
        self._bar.refresh()
