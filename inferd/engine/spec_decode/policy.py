"""How many tokens to propose, per sequence and per step, from measurements rather than constants.

Two measured models decide it:
- acceptance: per sequence, an exponentially weighted estimate α of the chance that a proposed token is accepted
  (so the j-th proposal of a run lands with chance ≈ α^j); a new sequence starts from the workload's rate (the
  same estimate over all sequences' runs), and between proposals α relaxes toward it, so a sequence whose
  proposals failed is tried again later, but a proposer that fails everywhere is not;
- step time: measured from the engine's own steps as a function of their tokens, separately for decode steps
  (one row per sequence, or 1 + its proposals when verifying: all decode rows, the fused path on the CPU) and for
  mixed ones (with prefill chunks: the multi-token path); see StepTimeModel.
For a step with O sequences about to decode, drafts are taken in order of their acceptance chance while the
expected tokens per second, (O + Σ accepted) / t(O + drafts), keeps rising. Large batches (where a step's time
grows with its tokens) therefore switch speculation off by themselves, as does a low acceptance rate. So that the time model keeps seeing what
verification costs, a policy that has verified nothing for `explore_every` steps verifies one proposal once: of
the sequence likeliest to accept it, so the probe adds one row (probing every sequence of a large batch at once
could push the step past the fused kernels' row limit: the most expensive step there is, to learn what it saves).

Step sizes never measured are not trusted: a plan grows a step at most one row past the largest decode step measured
(the cost past a kernel's row limit, e.g. the fused bf16 decoder's 16, is a cliff no extrapolation foresees), so
each larger size is measured on one extra row before more rows go there. And when even proposals that always land
could not raise tokens/s at the measured step times (a batch at the fused row limit, where one more row costs
half a step), the step does not speculate at all: nothing is proposed, and only every `reprobe_every`-th such step
probes one row, so a stale measurement can be corrected.
"""

from __future__ import annotations

import bisect
import collections
import statistics


class StepTimeModel:
    """Measured step time as a function of the step's tokens, kept separately for decode steps (decode and
    verification rows only: the fused decode path) and mixed steps (with prefill chunks).

    The latest steps are kept per bucket of tokens (each size its own up to `exact_upto` tokens, then powers of
    two), their medians interpolated between buckets; a step's cost is nearly flat while the weights' memory
    traffic dominates (a few rows) and grows once compute does, which one straight line fits badly, and at a few
    rows it moves in steps a coarse bucket hides (the bf16 GEMM splits the rows into chunks of at most 5 per pass
    over each weight block: 16 rows are four passes against 15's three, a step ~14% slower in one measurement). Where mixed steps of that size were never measured, the
    pure-decode curve stands in, and past the largest measured size the last segment's slope (flat from a single
    point): optimistic where nothing is known, so verification gets tried, measured, and then judged.
    """

    def __init__(self, window: int = 15, exact_upto: int = 32):
        self.window, self.exact_upto = window, exact_upto
        # mixed? → {bucket: the latest (tokens, seconds) of steps that fell in that bucket}
        self.buckets: dict[bool, dict[int, collections.deque]] = {False: {}, True: {}}
        self._medians: dict[bool, dict[int, tuple[float, float]]] = {False: {}, True: {}}  # per bucket
        self._points: dict[bool, list[tuple[float, float]]] = {}
        self._xs: dict[bool, list[float]] = {}  # the points' tokens, for bisect
        self.prior = 0.05  # seconds, for a step before anything was measured
        self.largest = {False: 0, True: 0}  # the most tokens of a measured step, per kind

    def _bucket(self, tokens: int) -> int:
        return tokens if tokens <= self.exact_upto else 1 << max(tokens - 1, 0).bit_length()

    def observe(self, tokens: int, mixed: bool, seconds: float) -> None:
        table, b = self.buckets[mixed], self._bucket(tokens)
        q = table.setdefault(b, collections.deque(maxlen=self.window))
        q.append((tokens, seconds))
        self.largest[mixed] = max(self.largest[mixed], tokens)
        # only this bucket's medians change: recomputed here, once per step (the engine's per-step cost). Under 3
        # steps a median is no defence against a step stalled by another process (stalls only ever add time): the
        # fastest of them stands in until then, so one stalled probe does not price a step size out for good
        if len(q) >= 3:
            self._medians[mixed][b] = (statistics.median(t for t, _ in q), statistics.median(s for _, s in q))
        else:
            self._medians[mixed][b] = min(q, key=lambda ts: ts[1])
        self._points.pop(mixed, None)

    def points(self, mixed: bool) -> list[tuple[float, float]]:
        """(median tokens, median seconds) per measured bucket: medians, so that a step stalled by another
        process on the machine does not move the estimate. Kept until the next observation (a plan predicts
        once per candidate proposal)."""
        pts = self._points.get(mixed)
        if pts is None:
            pts = self._points[mixed] = sorted(self._medians[mixed].values())
            self._xs[mixed] = [x for x, _ in pts]
        return pts

    def _curve(self, tokens: int, mixed: bool) -> float | None:
        pts = self.points(mixed)
        if not pts:
            return None
        if tokens <= pts[0][0]:
            return pts[0][1]
        if tokens >= pts[-1][0]:  # past the data: the last segment's slope (flat from a single point)
            if len(pts) == 1:
                return pts[0][1]
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
            return y1 + max(y1 - y0, 0.0) / max(x1 - x0, 1e-9) * (tokens - x1)
        i = bisect.bisect_left(self._xs[mixed], tokens)  # pts[i - 1][0] < tokens <= pts[i][0]
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (tokens - x0) / max(x1 - x0, 1e-9) * (y1 - y0)

    def within_reach(self, tokens: int, mixed: bool) -> bool:
        """Whether predict(tokens, mixed) rests on measurements: interpolated, or at most one row past the
        largest decode step measured. Mixed steps are priced on their own curve once measured at that size, but a
        step counted as mixed because requests wait may still run decode rows only (nothing admitted), so the
        decode-only bound holds for them too: a row cliff is never planned into unmeasured."""
        mixed_pts = self.points(True)
        if mixed and mixed_pts and mixed_pts[0][0] <= tokens:
            return tokens <= min(self.largest[True], self.largest[False]) + 1
        return tokens <= self.largest[False] + 1

    def predict(self, tokens: int, mixed: bool) -> float:
        mixed_pts = self.points(True)
        if mixed and mixed_pts and mixed_pts[0][0] <= tokens:
            t = self._curve(tokens, True)
        else:
            t = self._curve(tokens, False)
            if t is None:
                t = self._curve(tokens, True)
        return self.prior if t is None else t


class SpecPolicy:
    def __init__(self, max_tokens: int, prior_alpha: float = 0.6, decay: float = 0.7, relax: float = 0.05,
                 explore_every: int = 16, min_chance: float = 0.1):
        self.max_tokens = max_tokens
        # a row is never free (K/V written, logits sampled), even where the measured step time looks flat: a
        # proposal that lands with less than this chance is not verified
        self.min_chance = min_chance
        # a model fitted only from steps without verification cannot tell what verification costs: every
        # `explore_every`-th step that would verify nothing verifies one proposal anyway (one row: see above)
        self.explore_every, self.idle_steps = explore_every, 0
        self.probe_share = 0.02  # the most of the time probes may cost (see plan)
        # a plan must promise this much more tokens/s than not verifying: the time model's medians carry noise (a
        # step size seen a few times on a shared machine), and a marginal verification mistaken is a loss
        self.margin = 0.02
        # a step where verification cannot pay even at full acceptance (see could_pay) probes this rarely
        self.reprobe_every, self.hopeless_steps = 256, 0
        self.skipped_steps = 0  # steps that did not speculate because nothing could pay (a counter, for tests)
        self.decay, self.relax = decay, relax
        self.acceptance: dict[str, float] = {}  # request id → estimated chance a proposed token is accepted
        # the same over every sequence's runs, slower to move: where a new sequence starts and where an untried one
        # drifts back to, so a proposer that keeps failing (a weak draft model, prompt lookup on free-form chat)
        # is not retried at the optimistic prior again and again
        # (accepted, tested) positions, exponentially weighted per run: their ratio, not a mean of per-run ratios
        # (runs that stop at their first rejection make those biased low); starts as two tested at the prior
        self._workload = (2 * prior_alpha, 2.0)
        self.workload_decay = 0.95
        self.time_model = StepTimeModel()

    def forget(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)

    def alpha(self, request_id: str) -> float:
        return self.acceptance.get(request_id, self.workload_alpha)

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        """After verification: `accepted` of `proposed` landed (a run stops at the first rejection)."""
        a = self.alpha(request_id)
        if proposed == 0:  # not tried this step: drift back toward the workload's rate so it is tried again
            self.acceptance[request_id] = a + self.relax * (self.workload_alpha - a)
            return
        # observed per-token acceptance for a run: accepted tokens over the positions actually tested
        tested = accepted + (1 if accepted < proposed else 0)
        self.acceptance[request_id] = self.decay * a + (1 - self.decay) * (accepted / tested)
        w, (acc, tst) = self.workload_decay, self._workload
        self._workload = (w * acc + accepted, w * tst + tested)

    @property
    def workload_alpha(self) -> float:
        acc, tested = self._workload
        return acc / tested

    def could_pay(self, num_decoding: int, mixed_anyway: bool, max_rows: int, num_seqs: int,
                  pass_seconds: float = 0.0, first_seconds: float = 0.0) -> bool:
        """Whether verifying up to `max_rows` proposals of `num_seqs` sequences could raise the step's tokens/s if
        every proposal landed, at the measured (or one-row-past-measured) step times; `first_seconds`: the
        cheapest first-proposal cost (a draft model's catch-up)."""
        tm = self.time_model
        base = num_decoding / tm.predict(num_decoding, mixed_anyway) * (1 + self.margin)  # as plan asks
        for n in range(1, max_rows + 1):
            if not tm.within_reach(num_decoding + n, mixed_anyway):
                break
            longest = -(-n // max(num_seqs, 1))
            t = tm.predict(num_decoding + n, mixed_anyway) + pass_seconds * longest + first_seconds
            if (num_decoding + n) / t > base:
                return True
        return False

    def skip_step(self, num_decoding: int, mixed_anyway: bool, max_rows: int, num_seqs: int,
                  pass_seconds: float = 0.0, first_seconds: float = 0.0) -> bool:
        """True: the coming step does not speculate (nothing is proposed), because not even proposals that all land
        could pay; every `reprobe_every`-th such step is let through to plan (and its probe), so the measurement
        that priced verification out is taken again now and then."""
        if max_rows <= 0:  # no room for proposals: nothing to decide (a due re-probe stays due)
            return False
        if self.could_pay(num_decoding, mixed_anyway, max_rows, num_seqs, pass_seconds, first_seconds):
            self.hopeless_steps = 0
            return False
        self.hopeless_steps += 1
        if self.hopeless_steps >= self.reprobe_every:  # due until a probe is made (a step may have no proposal)
            self.idle_steps = 1 << 30  # the plan that follows probes one row, whatever the probe costs
            return False
        self.skipped_steps += 1
        return True

    def plan(self, available: dict[str, int], num_decoding: int, mixed_anyway: bool,
             pass_seconds: float = 0.0, first_seconds: dict[str, float] | None = None,
             critical: set[str] | None = None) -> dict[str, int]:
        """How many of its available proposals each sequence sends into the coming step (absent: none).
        `num_decoding`: sequences that will sample a token; `mixed_anyway`: the step has prefill work regardless
        (so verification rows add no fixed cost); `pass_seconds`: what making one more proposal per sequence
        costs (a draft model's forward pass; 0 for prompt lookup); `first_seconds`: what a sequence's first
        proposal costs on top (a draft model catching its cache up with the sequence).
        `critical`: when no request waits for a slot (a closed batch), the sequences with the most tokens left to
        go (by their budgets): the batch lasts as long as they do. A token accepted for another sequence does not
        shorten the batch, it only spares that sequence one row of a later step, so it is valued at what a row
        costs (the measured step time's slope) against what a step's tokens cost on average (None: every
        sequence's tokens count in full, as when finishing one lets a waiting request in)."""
        first = first_seconds or {}
        tm = self.time_model
        w_other = 1.0
        if critical is not None and num_decoding > 0:
            t_now = tm.predict(num_decoding, mixed_anyway)
            w_other = min(max(tm.predict(num_decoding + 1, mixed_anyway) - t_now, 0.0) / (t_now / num_decoding), 1.0)
        cand = []  # (expected value of this draft: its acceptance chance, weighted; request id)
        for rid, n_avail in available.items():
            a = self.alpha(rid)
            w = w_other if critical is not None and rid not in critical else 1.0
            p = 1.0
            for _ in range(min(n_avail, self.max_tokens)):
                p *= a
                if p < self.min_chance:
                    break
                cand.append((p * w, rid))
        cand.sort(key=lambda x: -x[0])
        best_rate = num_decoding / tm.predict(num_decoding, mixed_anyway) * (1 + self.margin)
        best_n, gain, depth, longest, catch_up = 0, 0.0, {}, 0, 0.0
        for n, (p, rid) in enumerate(cand, 1):
            if not tm.within_reach(num_decoding + n, mixed_anyway):  # never past one row beyond what was measured
                break
            gain += p
            depth[rid] = depth.get(rid, 0) + 1
            longest = max(longest, depth[rid])
            catch_up += first.get(rid, 0.0) if depth[rid] == 1 else 0.0
            rate = (num_decoding + gain) / (tm.predict(num_decoding + n, mixed_anyway) + pass_seconds * longest
                                            + catch_up)
            if rate > best_rate:
                best_rate, best_n = rate, n
        if best_n == 0 and available:  # also below min_chance: a rate that is never re-measured could never rise
            self.idle_steps += 1
            # the cheapest probe (least catching up), then the likeliest to land. Probes cost at most probe_share
            # of the time: an expensive one waits longer (a draft's long catch-up; or one more row that takes the
            # step off the fused path, as a 17th row of bf16 does: measured in the step-time model)
            rid = min(available, key=lambda r: (first.get(r, 0.0), -self.alpha(r)))
            t_now = tm.predict(num_decoding, mixed_anyway)
            extra = max(tm.predict(num_decoding + 1, mixed_anyway) - t_now, 0.0) + first.get(rid, 0.0) + pass_seconds
            if self.idle_steps >= max(self.explore_every, extra / (self.probe_share * t_now)):
                self.idle_steps = self.hopeless_steps = 0
                return {rid: 1}
        else:
            self.idle_steps = 0
            if best_n:
                self.hopeless_steps = 0
        plan: dict[str, int] = {}
        for _, rid in cand[:best_n]:
            plan[rid] = plan.get(rid, 0) + 1
        return plan
