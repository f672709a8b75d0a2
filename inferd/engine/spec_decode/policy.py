"""How many tokens to propose, per sequence and per step, from measurements rather than constants.

Two measured models decide it:
- acceptance: per sequence, an exponentially weighted estimate α of the chance that a proposed token is accepted
  (so the j-th proposal of a run lands with chance ≈ α^j); between proposals it relaxes toward the prior, so a
  sequence whose proposals failed is tried again later;
- step time: t ≈ a + b·tokens + c·mixed, fitted online (weighted least squares with forgetting) over the engine's
  steps, where `mixed` marks steps that are not pure single-token decodes (verification rows run on the
  multi-token path, which costs more per step than the fused decode on some CPUs).
For a step with O sequences about to decode, drafts are taken in order of their acceptance chance while the
expected tokens per second, (O + Σ accepted) / t(O + drafts), keeps rising. Large batches (b·O ≫ a) therefore
switch speculation off by themselves, as does a low acceptance rate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Acceptance:
    alpha: float


class StepTimeModel:
    """Online fit of t = a + b·tokens + c·mixed (weighted least squares, older steps forgotten geometrically)."""

    def __init__(self, forget: float = 0.98):
        self.forget = forget
        self.xtx = [[0.0] * 3 for _ in range(3)]
        self.xty = [0.0] * 3
        self.steps = 0
        self.coef = (1.0, 0.01, 0.0)  # prior until measured: per-step cost dominates, tokens are cheap

    def observe(self, tokens: int, mixed: bool, seconds: float) -> None:
        x = (1.0, float(tokens), 1.0 if mixed else 0.0)
        f = self.forget
        for i in range(3):
            self.xty[i] = f * self.xty[i] + x[i] * seconds
            for j in range(3):
                self.xtx[i][j] = f * self.xtx[i][j] + x[i] * x[j]
        self.steps += 1
        if self.steps >= 8:
            self.coef = self._solve()

    def _solve(self) -> tuple[float, float, float]:
        # a tiny ridge term keeps the system solvable while some feature has not varied yet (all-decode steps)
        scale = max(self.xtx[0][0], 1e-9)
        m = [row[:] + [self.xty[i]] for i, row in enumerate(self.xtx)]
        for i in range(3):
            m[i][i] += 1e-6 * scale
        for col in range(3):  # Gauss-Jordan on the 3x4 augmented matrix
            piv = max(range(col, 3), key=lambda r: abs(m[r][col]))
            m[col], m[piv] = m[piv], m[col]
            if abs(m[col][col]) < 1e-18:
                return self.coef
            for r in range(3):
                if r != col:
                    k = m[r][col] / m[col][col]
                    m[r] = [a - k * b for a, b in zip(m[r], m[col])]
        a, b, c = (m[i][3] / m[i][i] for i in range(3))
        return max(a, 1e-6), max(b, 0.0), max(c, 0.0)

    def predict(self, tokens: int, mixed: bool) -> float:
        a, b, c = self.coef
        return a + b * tokens + (c if mixed else 0.0)


class SpecPolicy:
    def __init__(self, max_tokens: int, prior_alpha: float = 0.6, decay: float = 0.7, relax: float = 0.05):
        self.max_tokens = max_tokens
        self.prior, self.decay, self.relax = prior_alpha, decay, relax
        self.acceptance: dict[str, _Acceptance] = {}
        self.time_model = StepTimeModel()

    def forget(self, request_id: str) -> None:
        self.acceptance.pop(request_id, None)

    def alpha(self, request_id: str) -> float:
        return self.acceptance.setdefault(request_id, _Acceptance(self.prior)).alpha

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        """After verification: `accepted` of `proposed` landed (a run stops at the first rejection)."""
        st = self.acceptance.setdefault(request_id, _Acceptance(self.prior))
        if proposed == 0:  # not tried this step: drift back toward the prior so it is tried again
            st.alpha += self.relax * (self.prior - st.alpha)
            return
        # observed per-token acceptance for a run: accepted tokens over the positions actually tested
        tested = accepted + (1 if accepted < proposed else 0)
        st.alpha = self.decay * st.alpha + (1 - self.decay) * (accepted / tested)

    def plan(self, available: dict[str, int], num_decoding: int, mixed_anyway: bool,
             pass_seconds: float = 0.0) -> dict[str, int]:
        """How many of its available proposals each sequence sends into the coming step (absent: none).
        `num_decoding`: sequences that will sample a token; `mixed_anyway`: the step has prefill work regardless
        (so verification rows add no fixed cost); `pass_seconds`: what making one more proposal per sequence
        costs (a draft model's forward pass; 0 for prompt lookup)."""
        cand = []  # (acceptance chance of this draft, request id)
        for rid, n_avail in available.items():
            a = self.alpha(rid)
            p = 1.0
            for _ in range(min(n_avail, self.max_tokens)):
                p *= a
                cand.append((p, rid))
        cand.sort(key=lambda x: -x[0])
        tm = self.time_model
        best_rate = num_decoding / tm.predict(num_decoding, mixed_anyway)
        best_n, gain, depth, longest = 0, 0.0, {}, 0
        for n, (p, rid) in enumerate(cand, 1):
            gain += p
            depth[rid] = depth.get(rid, 0) + 1
            longest = max(longest, depth[rid])
            rate = (num_decoding + gain) / (tm.predict(num_decoding + n, True) + pass_seconds * longest)
            if rate > best_rate:
                best_rate, best_n = rate, n
        plan: dict[str, int] = {}
        for _, rid in cand[:best_n]:
            plan[rid] = plan.get(rid, 0) + 1
        return plan
