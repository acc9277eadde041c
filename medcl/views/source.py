"""The input of every view sampler: one volume with its geometry and foreground box."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from medcl.core.errors import MedclDataError


@dataclass
class SourceVolume:
    """A volume to cut SSL views from.

    Attributes:
        image: ``[C, X, Y, Z]`` float intensities (array axes = voxel indices i, j, k); any device.
        affine: ``[4, 4]`` float64 voxel index -> RAS+ mm.
        fg_box: ``[2, 3]`` int64 foreground box in voxels, rows ``start`` (inclusive) and ``stop``
            (exclusive).
        source_id: the id every view of this volume carries (global across ranks when the caller
            gives global ids, e.g. the dataset index).
        name: what error messages name (a case id or path).

    Derived geometry (float64, on the CPU, computed once):

    * :attr:`spacing` ``[3]`` mm per voxel step along i, j, k;
    * :attr:`ras_axes` ``[3, 3]`` the signed permutation whose column ``d`` is the voxel axis (with its
      sign) that points most towards world axis ``d`` (R, A, S);
    * :attr:`vox_to_norm` ``[4, 4]`` voxel -> normalised foreground-box coordinates ``u``: ``u[0]``
      increases towards the patient's Right, ``u[1]`` Anterior, ``u[2]`` Superior, and the box spans
      ``[0, 1]^3`` (from the outer face of its first voxel to the outer face of its last). Defined through
      the nearest voxel axes, so it is exact for any orientation and oblique volumes are normalised along
      their own axes;
    * :attr:`norm` ``[4, 4]`` world mm -> ``u`` (``vox_to_norm @ inv(affine)``), the ``ViewBatch.norm``.
    """

    image: torch.Tensor
    affine: torch.Tensor
    fg_box: torch.Tensor
    source_id: int = 0
    name: str = ""
    _geom: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        what = self.name or f"source {self.source_id}"
        if hasattr(self.image, "as_tensor"):  # a MONAI MetaTensor: keep the voxels, the affine is ours
            self.image = self.image.as_tensor()
        if not isinstance(self.image, torch.Tensor) or self.image.ndim != 4:
            shape = tuple(self.image.shape) if hasattr(self.image, "shape") else type(self.image).__name__
            raise MedclDataError(what, f"image must be a [C, X, Y, Z] tensor, got {shape}")
        if not torch.is_floating_point(self.image):
            self.image = self.image.float()
        aff = self.affine.as_tensor() if hasattr(self.affine, "as_tensor") else self.affine
        aff = torch.as_tensor(aff, dtype=torch.float64).detach().cpu()
        if tuple(aff.shape) != (4, 4) or not bool(torch.isfinite(aff).all()):
            raise MedclDataError(what, f"affine must be a finite 4x4 matrix, got shape {tuple(aff.shape)}")
        if abs(float(torch.linalg.det(aff[:3, :3]))) < 1e-12:
            raise MedclDataError(what, "affine is singular (zero spacing or collinear axes)")
        self.affine = aff
        shape = torch.tensor(self.image.shape[1:], dtype=torch.long)
        if self.fg_box is None:
            box = torch.stack([torch.zeros(3, dtype=torch.long), shape])
        else:
            box = self.fg_box.as_tensor() if hasattr(self.fg_box, "as_tensor") else self.fg_box
            box = torch.as_tensor(box).detach().cpu().long()
        if tuple(box.shape) != (2, 3):
            raise MedclDataError(what, f"fg_box must be [2, 3] (start, stop), got shape {tuple(box.shape)}")
        if bool((box[0] < 0).any() or (box[1] > shape).any() or (box[1] <= box[0]).any()):
            raise MedclDataError(
                what, f"fg_box {box.tolist()} is empty or outside the image of shape {tuple(shape.tolist())}"
            )
        self.fg_box = box

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_item(cls, item: Mapping[str, Any], source_id: int) -> SourceVolume:
        """From a ``CaseDataset`` item ``{"image": MetaTensor [C, X, Y, Z], "fg_box": [2, 3], "id": str}``.

        The affine is the MetaTensor's ``.affine`` (the preprocessed voxel -> mm map); a plain tensor
        image needs an ``"affine"`` entry. A missing ``fg_box`` means the whole volume.
        """
        name = str(item.get("id", f"item {source_id}"))
        if "image" not in item:
            raise MedclDataError(name, "dataset item has no 'image'")
        image = item["image"]
        affine = item.get("affine", getattr(image, "affine", None))
        if affine is None:
            raise MedclDataError(name, "image has no affine (expected a MONAI MetaTensor or an 'affine' entry)")
        if hasattr(image, "as_tensor"):
            image = image.as_tensor()
        image = torch.as_tensor(image)
        return cls(image=image, affine=torch.as_tensor(affine), fg_box=item.get("fg_box"), source_id=int(source_id), name=name)

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.image.device

    def _geometry(self) -> dict[str, torch.Tensor]:
        if self._geom:
            return self._geom
        lin = self.affine[:3, :3]
        spacing = lin.norm(dim=0)
        direction = lin / spacing  # unit columns: world direction of each voxel axis
        # Assign each world axis the voxel axis closest to it, greedily by |cosine| (a permutation even
        # for oblique volumes, as nibabel's io_orientation does).
        cos = direction.abs().clone()
        ras = torch.zeros(3, 3, dtype=torch.float64)
        for _ in range(3):
            flat = int(torch.argmax(cos))
            w, e = divmod(flat, 3)
            ras[e, w] = 1.0 if direction[w, e] >= 0 else -1.0
            cos[w, :] = -1.0
            cos[:, e] = -1.0
        start = self.fg_box[0].double()
        size = (self.fg_box[1] - self.fg_box[0]).double()
        # q = (p - start + 0.5) / size in [0, 1] along voxel axes, then u = flip(perm(q)) towards RAS
        box = torch.eye(4, dtype=torch.float64)
        box[:3, :3] = torch.diag(1.0 / size)
        box[:3, 3] = (0.5 - start) / size
        perm = torch.eye(4, dtype=torch.float64)
        perm[:3, :3] = ras.T  # u_w = sign * q_e
        perm[:3, 3] = (ras.T.sum(dim=1) < 0).double()  # flipped axes: u = 1 - q
        vox_to_norm = perm @ box
        self._geom.update(
            spacing=spacing,
            ras_axes=ras,
            vox_to_norm=vox_to_norm,
            norm=vox_to_norm @ torch.linalg.inv(self.affine),
        )
        return self._geom

    @property
    def spacing(self) -> torch.Tensor:
        """``[3]`` float64 mm per voxel along i, j, k."""
        return self._geometry()["spacing"]

    @property
    def ras_axes(self) -> torch.Tensor:
        """``[3, 3]`` float64 signed permutation, column ``d`` = voxel axis pointing to world axis ``d``."""
        return self._geometry()["ras_axes"]

    @property
    def vox_to_norm(self) -> torch.Tensor:
        """``[4, 4]`` float64 voxel -> normalised foreground-box coordinates (R, A, S order)."""
        return self._geometry()["vox_to_norm"]

    @property
    def norm(self) -> torch.Tensor:
        """``[4, 4]`` float64 world mm -> normalised foreground-box coordinates (R, A, S order)."""
        return self._geometry()["norm"]
