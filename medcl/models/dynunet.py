"""nnU-Net-style U-Net (MONAI ``DynUNet``) with named stages.

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 2021; MONAI's ``DynUNet`` implementation of it.

The blocks are MONAI's own: we build a ``monai.networks.nets.DynUNet`` (so initialisation and block
layout are exactly MONAI's) and re-register its ``input_block`` + ``downsamples`` as ``encoder``,
``bottleneck`` as ``bottleneck``, ``upsamples`` as ``decoder`` and ``output_block`` as ``head``. The
forward pass is the same computation as ``DynUNet.forward`` without deep supervision, but every stage's
map is returned. :func:`dynunet_key_map` converts MONAI ``DynUNet`` state dicts to these names (key map
``monai-dynunet`` in :mod:`medcl.models.keymaps`).

Stages for ``filters=(16, 32, 64, 128)``, ``strides=(1, 2, 2, 2)`` and a ``[B, C, 48, 48, 48]`` input:

============  ========  ======  ==============
stage         channels  stride  map
============  ========  ======  ==============
encoder.0     16        1       [B, 16, 48^3]
encoder.1     32        2       [B, 32, 24^3]
encoder.2     64        4       [B, 64, 12^3]
bottleneck    128       8       [B, 128, 6^3]
decoder.0     64        4       [B, 64, 12^3]
decoder.1     32        2       [B, 32, 24^3]
decoder.2     16        1       [B, 16, 48^3]
head          classes   1       logits
============  ========  ======  ==============
"""

from __future__ import annotations

from monai.networks.nets import DynUNet
from torch import Tensor, nn

from medcl.models.backbone import Backbone, BackboneConfig, as_triple
from medcl.models.keymaps import KeyMap, register_keymap

_NORMS = {"instance": ("INSTANCE", {"affine": True}), "batch": ("BATCH", {"affine": True})}


class DynUNetBackbone(Backbone):
    """MONAI DynUNet as a :class:`~medcl.models.backbone.Backbone`.

    Args:
        config: ``name="dynunet"``; uses ``in_channels``, ``out_channels``, ``filters``, ``strides``,
            ``kernel_sizes``, ``res_block``, ``norm``, ``dropout``. Deep supervision is not built: the
            decoder maps are returned instead, so a caller can attach its own auxiliary heads.

    Shapes:
        input ``[B, in_channels, D, H, W]`` with ``D, H, W`` multiples of ``prod(strides)`` (per axis).
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__(config)
        n = len(config.filters)
        strides = [as_triple(s) for s in config.strides]
        kernels = [as_triple(k) for k in (config.kernel_sizes or (3,) * n)]
        net = DynUNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=max(1, int(config.out_channels or 0)),
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(config.filters),
            dropout=config.dropout or None,
            norm_name=_NORMS[config.norm],
            deep_supervision=False,
            res_block=config.res_block,
        )
        self.encoder = nn.ModuleList([net.input_block, *net.downsamples])
        self.bottleneck = net.bottleneck
        self.decoder = nn.ModuleList(list(net.upsamples))
        self.head = net.output_block if config.has_head else None

        self._set_unet_stages(config.filters, strides)

    @property
    def input_weight_keys(self) -> list[str]:
        keys = ["encoder.0.conv1.conv.weight"]
        if hasattr(self.encoder[0], "conv3"):  # residual block with a 1x1x1 projection of the input
            keys.append("encoder.0.conv3.conv.weight")
        return keys

    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        maps: list[Tensor] = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            maps.append(h)
        return maps, self.bottleneck(h)


def dynunet_key_map(n_levels: int) -> list[tuple[str, str]]:
    """(MONAI ``DynUNet`` prefix, medcl prefix) pairs for a DynUNet with ``n_levels`` filters.

    ``skip_layers.*`` in a MONAI state dict are duplicates of the same tensors and are dropped by
    :func:`medcl.models.keymaps.apply_keymap` (map ``monai-dynunet``); deep-supervision heads have no counterpart.
    """
    pairs = [("input_block.", "encoder.0.")]
    pairs += [(f"downsamples.{i}.", f"encoder.{i + 1}.") for i in range(n_levels - 2)]
    pairs += [("bottleneck.", "bottleneck.")]
    pairs += [(f"upsamples.{j}.", f"decoder.{j}.") for j in range(n_levels - 1)]
    pairs += [("output_block.", "head.")]
    return pairs


register_keymap(KeyMap(
    name="monai-dynunet",
    description="MONAI DynUNet state dict (input_block / downsamples / bottleneck / upsamples / output_block)",
    backbones=("dynunet",),
    pairs=lambda backbone: dynunet_key_map(len(backbone.config.filters)),
    drop=("skip_layers.",),  # DynUNet registers its blocks twice; these are the copies
))
