"""Latent Prototype Routing (Jiajie Yang 2025, arXiv 2506.21328), as its official code does it.

Reference: RANDO11199/LatentPrototypeRouter, ``model_zoo/router.py`` (TokenDistributionRouter,
VectorSimilarity + Cosine), ``model_zoo/Qwen3Moe.py`` and ``config/Qwen3MoeLPR.yaml`` (defaults).

Shape legend: T tokens on this rank, H hidden size, E experts, K top-k, D latent size (d_lat),
N tokens used by the latent diversity term (N <= T).

Forward:
1. Encode: h_TH = SiLU(LayerNorm(x_TH)); (mu_TD, logvar_TD) = Linear(H, 2D)(h_TH).chunk(2).
2. z_TD = mu + eps * exp(logvar / 2) in training (reparameterisation); z = mu in eval, so the
   router is deterministic there (the official code samples eps in eval too, but z only feeds
   the alignment loss, which eval does not use).
3. scores_TE = cosine(mu_TD, keys_ED): routing uses mu, not z; no temperature. Keys are
   ``randn(E, D)`` parameters, not normalised at init (the paper's "w/o init").
4. experts_TK, vals_TK = top-k of scores_TE; weights_TK = softmax(vals_TK) (softmax over the
   k cosines, so they already sum to 1: Qwen3's ``norm_topk_prob`` renormalisation is a no-op).
   Cosines lie in [-1, 1], so these weights are nearly uniform over the k experts.
   ``weight_temperature`` tau (ours, not in the official code; 1 = official) computes
   softmax(vals_TK / tau) instead: tau < 1 sharpens the weights (issue 25's test of whether
   LPR's flat weights are what lowers its loss). The alignment target (6.) keeps the cosines.
5. z_decoded_TH = Linear(D, H)(softmax(scores_TE) @ keys_ED): returned as
   ``Routing.expert_input_delta_TH`` so the layer feeds the experts ``x + z_decoded`` (the
   official MoE block adds it before the experts); ``add_decoded_latent: false`` turns it off.
6. Regularisers, each in ``Routing.losses`` already multiplied by its weight and ``loss_coef``
   (the official model-level factor ``router_kl_loss_coef`` applied to the per-layer sum):
   - ``lpr_diversity`` = loss_coef * div_weight * lambda * [D(mu_ND) + D(keys_ED)], with
     D(V) = mean((normalize(V) normalize(V)^T - I)^2) ("orthogonal") or the mean off-diagonal
     cosine ("cosine"). D(mu) builds an N x N Gram matrix; the official code uses all T tokens
     (N = T, cost T^2). ``diversity_max_tokens`` (default 1024) computes it on a uniform random
     sample of at most that many tokens instead (evenly strided in eval), at a bounded cost for
     large micro-batches; null gives the exact official term. The sample's mean off-diagonal
     entry is unbiased, so the "cosine" term is unbiased and the "orthogonal" term's
     expectation is (1 - 1/N) / (1 - 1/T) times the full one (its zero diagonal weighs 1/N
     instead of 1/T): within 0.1% for N = 1024. ``diversity_on`` (ours, not in the official code;
     ``both`` = official) keeps only D(mu) (``latents``) or only D(keys) (``keys``): issue 25's
     test of which half carries LPR's loss lead.
   - ``lpr_kl`` = loss_coef * kl_weight * mean_t KL(N(mu, sigma^2) || N(0, I)).
   - ``lpr_align`` = loss_coef * align_weight * mean |keys_ED - (W_TE^T z_TD).detach()| with
     W = softmax over ALL E of the top-k cosines scattered into zeros (non-selected experts get
     weight e^0, not 0), detached. W^T z is a SUM over this rank's T tokens, so the target's
     scale grows with the micro-batch size exactly as in the official code.
   Semantics of the three terms (``term_semantics``, ``balancing/semantics.py``), as the official
   code computes them per micro-batch (each rank and micro-batch its own; the loop averages):
   ``lpr_kl`` is ``token`` (a mean of per-token KLs: the same objective at any layout);
   ``lpr_diversity`` is ``micro_batch`` (D(mu) compares the micro-batch's tokens pairwise, and
   its zero diagonal weighs 1/N, so it changes with the micro-batch size; D(keys) has no tokens);
   ``lpr_align`` is ``micro_batch`` with a stop-gradient target that scales with the
   micro-batch's token count, so its meaning changes with DP, EP and ``grad_accum`` at a fixed
   global batch (what the official code does; our loop at least divides it by ``grad_accum``).
7. probs_TE = softmax(scores_TE) (what the official code's Switch loss would see, HF's
   ``load_balancing_loss_func`` on the cosines). logits_TE is None: the scores are cosines in
   [-1, 1], not logits, so a z-loss would only push tokens away from their prototypes
   (``has_logits = False``; the z_loss config check rejects the pair).

Initialisation (``init``): ``hf`` (default) as the official models get it from Hugging Face's
``PreTrainedModel._init_weights`` (``post_init`` reaches the router's modules too): the encoder
and ``out_proj`` weights ~ N(0, ``init_std`` = ``initializer_range`` 0.02), zero biases;
LayerNorm ones/zeros; keys ``randn`` (a Parameter, which ``_init_weights`` leaves alone).
``torch`` keeps PyTorch's ``nn.Linear`` default (Kaiming-uniform, std 1/sqrt(3 fan_in)): for
``out_proj`` (fan_in = d_lat = 16) that is ~0.14 instead of 0.02, so the decoded latent added to
the experts' input starts several times larger relative to that input (earlier moe_dist
releases used ``torch``; ``tests/routing/test_lpr.py`` measures the ratio).

``loss_coef`` is the factor of the per-layer regulariser sum IN THE OPTIMISED OBJECTIVE. The
official configs write ``router_kl_loss_coef: 0.01`` (our default), but the official trainer
(``model_zoo/utils.py`` ``TrainerWithLogger.compute_loss``, Hugging Face's Trainer with
``num_items_in_batch``) divides the summed LM loss of each micro-batch by the token count of the
whole accumulated step and adds ``0.01 * sum(layer losses)`` to EVERY micro-batch unscaled
(``model_zoo/Qwen3Moe.py``), so one optimizer step minimises CE + GA * 0.01 * mean regulariser:
0.27 with the Qwen3 / Mixtral LPR configs' ``gradient_accumulate_steps: 27``, 0.18 with
DeepSeekV3's 18. ``configs/compare/lpr_paper.yaml`` uses the effective 0.27 and keeps 0.01 as an
arm. (The same applies to the baselines' ``router_aux_loss_coef``: 1e-3 x GA.)

EMA keys (``ema_keys: true``, official ``update_expert_keys``, whose call site is commented out
in the released trainer, hence off by default): each training forward accumulates W^T z and
sum_t W into buffers; ``after_step`` all-reduces them over ``sync_group`` (default: the world
group, over which the native stack replicates the router; an integration whose router lives on a
subset of ranks sets it), then
``ema_sums = d * ema_sums + (1 - d) * sums``, ``ema_counts = d * ema_counts + (1 - d) * counts``,
``keys = ema_sums / clamp(ema_counts, 1e-6)``. The official code uses the last micro-batch of one
rank; we use all micro-batches of the step on all ranks so replicas stay identical. The step sums
are buffers, so the model's activation-checkpointing recompute (which restores every buffer of
the MoE layer) does not count a forward twice.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from moe_dist.balancing.semantics import LossSemantics
from moe_dist.registry import ROUTERS
from moe_dist.routing.base import Router, RouterConfig, Routing


class LPRConfig(RouterConfig):
    name: Literal["lpr"] = "lpr"
    latent_dim: int = Field(16, ge=1, description="d_lat, router_latent_dim")
    diversity_type: Literal["orthogonal", "cosine"] = "orthogonal"
    diversity_lambda: float = Field(1.0, ge=0.0)
    div_weight: float = Field(1.0, ge=0.0)
    kl_weight: float = Field(0.01, ge=0.0)
    align_weight: float = Field(0.1, ge=0.0, description="0.1 in the Qwen3 config, 0.05 for Mixtral/DeepSeek")
    loss_coef: float = Field(
        0.01,
        ge=0.0,
        description="factor of the per-layer sum in the optimised loss (official: 0.01 written, "
        "0.27 effective)",
    )
    diversity_on: Literal["both", "latents", "keys"] = Field(
        "both", description="D(mu) + D(keys) (official), or one of the two (ours)"
    )
    diversity_max_tokens: int | None = Field(
        1024, ge=2, description="D(mu) on a random sample of at most this many tokens (null = all, T x T)"
    )
    weight_temperature: float = Field(
        1.0, gt=0.0, description="top-k weights = softmax(cosines / this) (ours; 1 = official)"
    )
    add_decoded_latent: bool = Field(True, description="experts see x + z_decoded, as the official MoE block")
    ema_keys: bool = Field(False, description="EMA key update in after_step (off in the released training)")
    ema_decay: float = Field(0.8, ge=0.0, lt=1.0)
    unit_ball_init: bool = Field(False, description="normalise the random keys at init (paper's 'w/ init')")
    init: Literal["hf", "torch"] = Field(
        "hf", description="encoder/out_proj init: hf = N(0, init_std), zero bias (official); torch = default"
    )
    init_std: float = Field(0.02, gt=0.0, description="Hugging Face initializer_range (init: hf)")


def _as(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if p is None else p.to(x.dtype)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in ``x``'s dtype (the layer's weights cast, differentiably)."""
    return F.linear(x, _as(layer.weight, x), _as(layer.bias, x))


def diversity(v_MD: torch.Tensor, kind: str) -> torch.Tensor:
    """D(V): how far the rows of V are from mutually orthogonal (official DiversityRegularizer)."""
    M = v_MD.shape[0]
    if M < 2:
        return v_MD.new_zeros(())
    n_MD = F.normalize(v_MD, p=2, dim=-1)
    gram_MM = n_MD @ n_MD.t()
    if kind == "orthogonal":
        return F.mse_loss(gram_MM, torch.eye(M, dtype=gram_MM.dtype, device=gram_MM.device))
    return (gram_MM.sum() - gram_MM.diagonal().sum()) / (M * (M - 1))


def gaussian_kl(mu_TD: torch.Tensor, logvar_TD: torch.Tensor) -> torch.Tensor:
    """mean_t KL(N(mu_t, exp(logvar_t)) || N(0, I)), summed over latent dims."""
    return (-0.5 * torch.sum(1 + logvar_TD - mu_TD.pow(2) - logvar_TD.exp(), dim=-1)).mean()


@ROUTERS.register("lpr")
class LPRRouter(Router):
    Config = LPRConfig
    has_logits: ClassVar[bool] = False
    routing_batch = "token"  # mu, cosines and top-k per token
    term_semantics: ClassVar[dict[str, LossSemantics]] = {
        "lpr_diversity": LossSemantics("micro_batch"),
        "lpr_kl": LossSemantics("token"),
        "lpr_align": LossSemantics("micro_batch", stop_gradient=True),
    }

    def __init__(self, cfg: LPRConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__(cfg, hidden_size, num_experts)
        self.cfg: LPRConfig = cfg
        D, E = cfg.latent_dim, num_experts
        self.norm = nn.LayerNorm(hidden_size)
        self.encoder = nn.Linear(hidden_size, 2 * D)
        self.out_proj = nn.Linear(D, hidden_size)
        self.expert_keys = nn.Parameter(torch.empty(E, D, dtype=torch.float32))
        self.register_buffer("ema_sums_ED", torch.zeros(E, D))
        self.register_buffer("ema_counts_E", torch.zeros(E))
        # Sums of the current optimizer step's micro-batches, consumed by after_step.
        self.register_buffer("step_sums_ED", torch.zeros(E, D), persistent=False)
        self.register_buffer("step_counts_E", torch.zeros(E), persistent=False)
        self.sync_group: dist.ProcessGroup | None = None  # None = world (EMA sums only)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.encoder, self.out_proj):
            if self.cfg.init == "hf":
                nn.init.normal_(linear.weight, std=self.cfg.init_std)
                nn.init.zeros_(linear.bias)
            else:
                linear.reset_parameters()
        self.norm.reset_parameters()
        with torch.no_grad():
            keys = torch.randn(self.num_experts, self.cfg.latent_dim)
            self.expert_keys.copy_(F.normalize(keys, dim=-1) if self.cfg.unit_ball_init else keys)
            self.ema_sums_ED.copy_(self.expert_keys)
        self.ema_counts_E.zero_()

    def encode(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, mu, logvar); z = mu outside training. In ``x_TH``'s dtype whatever the
        parameters' (a bf16 module computes its router in fp32, see ``forward``)."""
        n = self.norm
        h_TH = F.layer_norm(x_TH, n.normalized_shape, _as(n.weight, x_TH), _as(n.bias, x_TH), n.eps)
        mu_TD, logvar_TD = _linear(self.encoder, F.silu(h_TH)).chunk(2, dim=-1)
        if self.training:
            z_TD = mu_TD + torch.randn_like(mu_TD) * torch.exp(0.5 * logvar_TD)
        else:
            z_TD = mu_TD
        return z_TD, mu_TD, logvar_TD

    def _diversity_sample(self, mu_TD: torch.Tensor) -> torch.Tensor:
        """At most ``diversity_max_tokens`` rows: uniform random in training, evenly strided in
        eval (so evaluation losses are reproducible)."""
        n, T = self.cfg.diversity_max_tokens, mu_TD.shape[0]
        if n is None or T <= n:
            return mu_TD
        if self.training:
            idx = torch.randperm(T, device=mu_TD.device)[:n]
        else:
            idx = torch.linspace(0, T - 1, n, device=mu_TD.device).round().long()
        return mu_TD[idx]

    def forward(self, x_TH: torch.Tensor) -> Routing:
        # The whole router in fp32 (fp64 kept, for gradcheck), even inside a bf16 autocast
        # region or a module cast to bf16 (Megatron-Core, DeepSpeed bf16): cosines and top-k near
        # ties are sensitive to rounding. Parameters are cast to it, gradients flow back.
        with torch.autocast(x_TH.device.type, enabled=False):
            routing = self._route(x_TH.to(torch.promote_types(x_TH.dtype, torch.float32)))
        if routing.expert_input_delta_TH is not None:
            routing.expert_input_delta_TH = routing.expert_input_delta_TH.to(x_TH.dtype)
        return routing

    def _route(self, x_TH: torch.Tensor) -> Routing:
        cfg = self.cfg
        z_TD, mu_TD, logvar_TD = self.encode(x_TH)
        keys_ED = self.expert_keys.to(mu_TD.dtype)
        scores_TE = F.cosine_similarity(mu_TD.unsqueeze(1), keys_ED.unsqueeze(0), dim=-1)
        vals_TK, experts_TK = scores_TE.topk(self.top_k, dim=-1)
        fp = torch.promote_types(scores_TE.dtype, torch.float32)  # fp32 at least, fp64 kept (gradcheck)
        tau = self.cfg.weight_temperature
        weights_TK = (vals_TK if tau == 1.0 else vals_TK / tau).softmax(dim=-1, dtype=fp)
        probs_TE = scores_TE.softmax(dim=-1, dtype=fp)

        delta_TH = None
        if cfg.add_decoded_latent:
            delta_TH = _linear(self.out_proj, scores_TE.softmax(dim=-1) @ keys_ED)

        # Alignment target: hard-ish routing weights over all E (zeros elsewhere, then softmax).
        w_TE = torch.zeros_like(scores_TE).scatter(1, experts_TK, vals_TK).softmax(dim=-1).detach()
        target_ED = (w_TE.t() @ z_TD).detach()
        if self.training and cfg.ema_keys:
            self.step_sums_ED += target_ED.to(self.step_sums_ED.dtype)
            self.step_counts_E += w_TE.sum(dim=0).to(self.step_counts_E.dtype)

        c = cfg.loss_coef
        kind, on = cfg.diversity_type, cfg.diversity_on
        div = mu_TD.new_zeros(())
        if on != "keys":
            div = div + diversity(self._diversity_sample(mu_TD), kind)
        if on != "latents":
            div = div + diversity(keys_ED, kind)
        div = cfg.diversity_lambda * div
        losses = {
            "lpr_diversity": c * cfg.div_weight * div,
            "lpr_kl": c * cfg.kl_weight * gaussian_kl(mu_TD, logvar_TD),
            "lpr_align": c * cfg.align_weight * (keys_ED - target_ED).abs().mean(),
        }
        return Routing(
            experts_TK=experts_TK,
            weights_TK=weights_TK,
            probs_TE=probs_TE,
            losses=losses,
            expert_input_delta_TH=delta_TH,
            every_slot_used=True,
        )

    @torch.no_grad()
    def after_step(self, global_counts_E: torch.Tensor) -> None:
        """EMA key update from the step's accumulated W^T z (only with ``ema_keys``)."""
        if not self.cfg.ema_keys:
            return
        sums_ED, counts_E = self.step_sums_ED.clone(), self.step_counts_E.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.sync_group) > 1:
            flat = torch.cat([sums_ED.flatten(), counts_E])
            dist.all_reduce(flat, group=self.sync_group)
            sums_ED, counts_E = flat[: sums_ED.numel()].view_as(sums_ED), flat[sums_ED.numel() :]
        self.step_sums_ED.zero_()
        self.step_counts_E.zero_()
        # no training forward since the last step: nothing changes (decided on the device, so
        # the step hook never waits for it)
        d = torch.where(counts_E.sum() > 0, self.cfg.ema_decay, 1.0).to(self.ema_sums_ED.dtype)
        self.ema_sums_ED.mul_(d).add_(sums_ED * (1 - d))
        self.ema_counts_E.mul_(d).add_(counts_E * (1 - d))
        keys_ED = self.ema_sums_ED / self.ema_counts_E.clamp(min=1e-6).unsqueeze(1)
        self.expert_keys.copy_(torch.where(d < 1, keys_ED.to(self.expert_keys.dtype), self.expert_keys))
