"""`LossSemantics`: what batch a balancing term is computed over, and so what training optimises.

Shape legend: N tokens in one optimizer step's global batch, W = DP x EP ranks, A =
``data.grad_accum`` micro-steps, n = N / (W * A) tokens in one rank's micro-batch.

Every stack moe_dist runs in optimises, for every aux term, the MEAN of its value over the
step's W * A micro-batches:

- native: ``(task + aux) / grad_accum`` per micro-batch, backward (``training/native_engine.py``
  ``forward_backward``), gradients summed over the ranks and divided by the world size
  (``training/grad_sync.py``);
- Megatron-Core: its schedule sets ``MoEAuxLossAutoScaler`` to ``1 / num_microbatches``, DP averages
  (with ``calculate_per_token_loss`` a token-weighted mean: the same for equal micro-batches);
- DeepSpeed: the engine divides the loss by the accumulation steps, DP averages.

No term multiplies itself by ``grad_accum`` (``grad_accum: mean``), so a coefficient means the same
at any ``grad_accum`` (Hugging Face's Trainer adds aux losses unscaled to every micro-batch, GA x
stronger: ``routing/lpr.py``, ``loss_coef``). What that mean equals depends on ``batch``:

============  ===============================  ==========================  ==========================
batch         the term on one micro-batch      optimised objective         invariant to
============  ===============================  ==========================  ==========================
token         mean of a per-token term         mean over the N tokens      DP, EP, grad_accum, n
sequence      mean of a per-sequence term      mean over all sequences     DP, EP, grad_accum, n
weights       a function of parameters only    the term itself             DP, EP, grad_accum, n
micro_batch   a statistic of the micro-batch   mean over W * A micro-      which rank and micro-step
                                               batches of n tokens         holds a micro-batch; NOT n
global        a statistic of the micro-step's  mean over the A micro-      the DP x EP split of a
              W micro-batches together         steps                       micro-step; NOT grad_accum
============  ===============================  ==========================  ==========================

Equal token counts per rank and micro-step are assumed (the data loader's fixed micro-batch
shape). ``global`` cannot be invariant to ``grad_accum`` inside a loop that runs the backward of
each micro-step before the next forward: the statistic of the whole step is known only after the
last forward. ``layers``: ``layer`` (a term per MoE layer, summed over layers) or ``model`` (one
term over every layer's routing at once, Hugging Face's ``load_balancing_loss_func``).

A term that depends on which experts were chosen (``uses_routing``) inherits the router's
``routing_batch``: under expert-choice routing a token's experts depend on the other tokens of
its micro-batch, so a per-sequence loss becomes a micro-batch statistic (`LossSemantics.under`).
``stop_gradient``: part of the term is held constant in the backward by definition (LPR's
alignment target), so its gradient is not the derivative of its value.

``tests/balancing/test_invariance.py`` checks every registered loss and router-owned term against
the single-process reference of its declared semantics; ``docs/balancing_semantics.md`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Batch = Literal["token", "sequence", "weights", "micro_batch", "global"]
RoutingBatch = Literal["token", "micro_batch"]

_INVARIANT: dict[str, tuple[str, ...]] = {
    "token": ("dp", "ep", "grad_accum", "micro_batch_size"),
    "sequence": ("dp", "ep", "grad_accum", "micro_batch_size"),
    "weights": ("dp", "ep", "grad_accum", "micro_batch_size"),
    "micro_batch": ("placement",),
    "global": ("dp", "ep"),
}

_OBJECTIVE = {
    "token": "mean over the global batch's tokens",
    "sequence": "mean over the global batch's sequences",
    "weights": "term itself (it has no tokens)",
    "micro_batch": "mean over the step's micro-batches of the term on each",
    "global": "mean over the micro-steps of the term on each micro-step's tokens of all DP x EP ranks",
}


@dataclass(frozen=True)
class LossSemantics:
    """A balancing term's declared meaning (module docstring). Frozen: a class attribute."""

    batch: Batch
    layers: Literal["layer", "model"] = "layer"
    uses_routing: bool = True
    stop_gradient: bool = False
    grad_accum: Literal["mean"] = "mean"

    def under(self, routing_batch: RoutingBatch) -> LossSemantics:
        """The semantics with a router whose choices depend on ``routing_batch``: a term that uses
        the choices of a micro-batch router is a micro-batch statistic. A ``global`` term of such
        choices means nothing layout-free (each rank's choices depend on its own micro-batch):
        ValueError (the built-in global loss rejects those routers at config time)."""
        if routing_batch == "token" or not self.uses_routing or self.batch == "micro_batch":
            return self
        if self.batch == "global":
            raise ValueError("a global statistic of choices that depend on each rank's micro-batch")
        return replace(self, batch="micro_batch")

    def invariant_to(self) -> tuple[str, ...]:
        """What the optimised objective does not depend on: ``dp``, ``ep``, ``grad_accum``,
        ``micro_batch_size`` (n), or only ``placement`` (which rank and micro-step holds which
        micro-batch, at a fixed n)."""
        return _INVARIANT[self.batch]

    def describe(self) -> str:
        """One line for documentation and messages."""
        extra = ", over all layers at once" if self.layers == "model" else ""
        stop = ", part held constant in the backward" if self.stop_gradient else ""
        return f"{self.batch}{extra}{stop}: optimises the {_OBJECTIVE[self.batch]}"


MICRO_BATCH = LossSemantics("micro_batch")
"""The default of a loss or router-owned term that declares nothing: true of any term computed
from one rank's micro-batch (the loop averages them); finer claims must be declared."""
