"""Plugin sections: ``model.moe.router`` and ``model.moe.losses[i]`` resolved to the config class
of the plugin they name, once, while the schema validates.

1. A section is a mapping (YAML, ``MoEConfig(router={...})``) or a config object already.
2. Its ``name`` is looked up in ``ROUTERS`` / ``LOSSES`` (built-ins, then entry points); an
   unknown name is an error at ``...router.name`` listing the known ones.
3. The mapping is validated against the plugin's ``Config`` class, so a typo (``top_kk``) or a
   bad value is an error at its full path (``model.moe.router.top_k``) like any other field.
4. The field holds that object (a ``RouterConfig`` / ``LossConfig`` subclass) and serializes
   every plugin field (``SerializeAsAny``), so a dumped config loads back the same.

Checks that need the model's hidden size or cross plugins (``Router.validate_config``,
``BalancingLoss.validate_config``) are ``plugin_errors``; ``validate_moe`` in the schema calls it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, SerializeAsAny

from moe_dist.balancing.base import BalancingLoss, LossConfig
from moe_dist.config.errors import field_error
from moe_dist.registry import LOSSES, ROUTERS, Registry, UnknownPluginError
from moe_dist.routing.base import Router, RouterConfig

DEFAULT_ROUTER = "topk_softmax"
ROUTER_HINT = "must be a mapping with at least a name, e.g. {name: topk_softmax, top_k: 2}"
LOSS_HINT = "each loss must be a mapping with a name and a coef, e.g. {name: switch, coef: 0.01}"


def _plugin_class(registry: Registry, name: Any) -> type:
    if not isinstance(name, str):
        raise field_error(("name",), "plugin_name", f"must be a string, got {name!r}", name)
    try:
        return registry.get(name)
    except (UnknownPluginError, ImportError) as exc:
        raise field_error(("name",), "plugin_name", str(exc) + _other_kind(registry, name), name) from None


def _other_kind(registry: Registry, name: str) -> str:
    """A router named where a loss goes, or the other way round (``router.name: simbal``)."""
    if registry is ROUTERS and name in LOSSES:
        return (
            f"; {name!r} is a balancing loss: list it under model.moe.losses, e.g. "
            f"losses: [{{name: {name}, coef: 0.1}}]"
            + (" with router {name: topk_softmax, init: orthogonal}" if name == "simbal" else "")
        )
    if registry is LOSSES and name in ROUTERS:
        return f"; {name!r} is a router: set model.moe.router.name={name}"
    return ""


def _resolve(registry: Registry, section: Any, default_name: str | None, hint: str) -> BaseModel:
    """The validated config object of the plugin ``section`` names."""
    if isinstance(section, BaseModel):
        cls = _plugin_class(registry, getattr(section, "name", None))
        if isinstance(section, cls.Config):
            return section
        section = section.model_dump()  # e.g. a base RouterConfig: revalidate as the plugin's class
    if not isinstance(section, dict):
        raise field_error((), "plugin_section", hint, section)
    name = section.get("name", default_name)
    if name is None:
        raise field_error(("name",), "plugin_name", f"required (one of {', '.join(registry.names())})", None)
    cls = _plugin_class(registry, name)
    return cls.Config.model_validate({**section, "name": name})


def _router_config(section: Any) -> BaseModel:
    return _resolve(ROUTERS, section, DEFAULT_ROUTER, ROUTER_HINT)


def _loss_config(section: Any) -> BaseModel:
    return _resolve(LOSSES, section, None, LOSS_HINT)


def default_router() -> RouterConfig:
    return _router_config({})


# The field types of MoEConfig: validated as the plugin's class, dumped with all its fields.
PluginRouterConfig = Annotated[SerializeAsAny[RouterConfig], BeforeValidator(_router_config)]
PluginLossConfig = Annotated[SerializeAsAny[LossConfig], BeforeValidator(_loss_config)]


def plugin_errors(
    router: RouterConfig,
    losses: list[tuple[int, LossConfig]],
    hidden: int,
    num_experts: int,
    prefix: str,
) -> list[str]:
    """The plugins' own cross-field checks; ``losses`` are (index in the config, config) pairs."""
    router_cls: type[Router] = ROUTERS.get(router.name)
    errors = [f"{prefix}.router.{m}" for m in router_cls.validate_config(router, hidden, num_experts)]
    for i, loss in losses:
        loss_cls: type[BalancingLoss] = LOSSES.get(loss.name)
        errors += [
            f"{prefix}.losses.{i}.{m}" for m in loss_cls.validate_config(loss, router_cls, num_experts)
        ]
    return errors
