"""The one registry of MIL heads (modelled on timm's ``register_model``).

A head is one module that defines the head class, optionally the dataclass of its config section, and one
registration of a builder::

    @dataclass
    class MyHeadConfig:                  # section ``myhead:`` of configs/mil/*.yaml
        width: int = 64

    @register_head("myhead", MyHead, section="myhead", section_config=MyHeadConfig,
                   instance_score="attention", paper="Someone et al., 2026")
    def _build(cfg, in_dim: int, n_classes: int) -> MyHead:
        return MyHead(in_dim, n_classes, **encoder_kwargs(cfg), width=cfg.myhead.width)

and one import line in :mod:`medcl.mil.heads` so the registration runs. The registry then gives the config
schema its section (:class:`medcl.mil.config.MILConfig` is assembled from the registered sections), the
``head:`` values the config accepts, :func:`build_head`, and the colour-bar label of the head's
``instance_scores`` in heatmaps (:func:`instance_score_name`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medcl.core.errors import MedclConfigError
from medcl.mil.heads.base import MILHead

__all__ = ["HeadSpec", "register_head", "head_spec", "head_names", "build_head", "instance_score_name",
           "config_sections", "encoder_kwargs"]

Builder = Callable[[Any, int, int], MILHead]


@dataclass(frozen=True)
class HeadSpec:
    """One registered head.

    Attributes:
        name: the ``head:`` value in a config.
        cls: the head class.
        build: ``build(cfg, in_dim, n_classes) -> head``.
        section: the config section the head reads (``None``: only ``encoder``).
        section_config: the dataclass of that section.
        instance_score: what the head's ``instance_scores`` are (heatmap colour-bar label).
        paper: the reference.
        wraps: the head wraps another registered head (SC-MIL); such a head cannot itself be wrapped.
    """

    name: str
    cls: type
    build: Builder
    section: str | None
    section_config: type | None
    instance_score: str
    paper: str
    wraps: bool = False


_HEADS: dict[str, HeadSpec] = {}
_SECTIONS: dict[str, type] = {}


def register_head(name: str, cls: type, *, section: str | None = None, section_config: type | None = None,
                  instance_score: str = "instance score", paper: str = "", wraps: bool = False
                  ) -> Callable[[Builder], Builder]:
    """Decorator registering ``build`` as the builder of head ``name`` (see the module docstring).

    Several heads may share a section (``abmil`` and ``gated_abmil``); they must give the same dataclass.
    """

    def deco(build: Builder) -> Builder:
        if name in _HEADS:
            raise ValueError(f"MIL head '{name}' is registered twice")
        if section is not None:
            known = _SECTIONS.get(section)
            if section_config is None and known is None:
                raise ValueError(f"MIL head '{name}': section '{section}' has no config dataclass yet")
            if section_config is not None and known is not None and known is not section_config:
                raise ValueError(f"MIL head '{name}': section '{section}' is already {known.__name__}")
            _SECTIONS.setdefault(section, section_config or known)  # type: ignore[arg-type]
        _HEADS[name] = HeadSpec(name, cls, build, section, _SECTIONS.get(section) if section else None,
                                instance_score, paper, wraps)
        return build

    return deco


def head_names(wrappers: bool = True) -> list[str]:
    """Registered head names in registration order (``wrappers=False``: those another head may wrap)."""
    return [n for n, s in _HEADS.items() if wrappers or not s.wraps]


def head_spec(name: str, key: str = "head") -> HeadSpec:
    """The registered head ``name``; an unknown name is a config error naming ``key`` and the known heads."""
    if name not in _HEADS:
        raise MedclConfigError(key, f"unknown MIL head {name!r} (known: {', '.join(_HEADS)})")
    return _HEADS[name]


def config_sections() -> dict[str, type]:
    """``{section name: dataclass}`` of every registered head, in registration order."""
    return dict(_SECTIONS)


def encoder_kwargs(cfg: Any) -> dict[str, Any]:
    """The instance-MLP arguments every head takes, from the config's ``encoder`` section."""
    return {"hidden": list(cfg.encoder.hidden), "dropout": cfg.encoder.dropout}


def build_head(cfg: Any, in_dim: int, n_classes: int, kind: str | None = None) -> MILHead:
    """The head named by ``cfg.head`` (or ``kind``), sized to ``in_dim`` features and ``n_classes`` classes."""
    return head_spec(kind or cfg.head).build(cfg, in_dim, n_classes)


def instance_score_name(kind: str) -> str:
    """What ``instance_scores`` of head ``kind`` are (``"instance score"`` for an unknown head)."""
    spec = _HEADS.get(kind)
    return spec.instance_score if spec is not None else "instance score"
