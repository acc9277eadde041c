"""Contrastive pretraining of the 2D patch encoder on slide tiles (``medcl mil pretrain-encoder``).

SimCLR (Chen et al., ICML 2020) on tiles, with the same contrastive core as the 3D pretraining: each tile
yields two views; :func:`medcl.losses.contrastive.gr_masks` makes the other view of the same tile the
positive and every view of the other tiles a negative; the loss is
:func:`medcl.losses.contrastive.info_nce` (``per_pair``, i.e. NT-Xent with one positive).

Views (vectorised over the batch, one ``grid_sample``):

- a random resized crop (area fraction ``scale``, aspect ``ratio``), composed with a random element of the
  dihedral group (flips and 90-degree rotations: histology has no canonical orientation), as one affine
  per view;
- stain augmentation in HED colour space (Tellez et al., "Quantifying the effects of data augmentation
  and stain color normalization in convolutional neural networks for computational pathology", MedIA
  2019): colour deconvolution with Ruifrok & Johnston's matrix (as ``skimage.color.rgb2hed``), each stain
  channel scaled by ``U(1 - s, 1 + s)`` and shifted by ``U(-s, s)``, back to RGB (``hed2rgb``).

With ``stain: macenko`` every tile is first normalised to the reference H&E appearance with its slide's
Macenko fit (:mod:`medcl.wsi.stain`, one fit per slide from ``stain_fit_tiles`` of its tiles); the jitter then
varies around that reference.

Tiles are read on the fly by DataLoader workers (:class:`medcl.wsi.extract.TileDataset`), sampled with
replacement across all slides. Writes ``encoder.pt`` (loadable by ``medcl mil extract --encoder``),
``metrics.csv`` and ``curves.png``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from skimage import color as _skc
from torch import nn

from medcl.core.errors import MedclDataError
from medcl.wsi.config import PretrainParams

log = logging.getLogger(__name__)

# Ruifrok & Johnston (2001) stain vectors, exactly scikit-image's (rows of ``rgb_from_hed``: H, E, DAB).
_RGB_FROM_HED = torch.from_numpy(_skc.rgb_from_hed.astype("float64"))
_HED_FROM_RGB = torch.from_numpy(_skc.hed_from_rgb.astype("float64"))
_LOG_ADJUST = math.log(1e-6)


def rgb_to_hed(rgb: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """RGB in ``[0, 1]`` ``[B, 3, H, W]`` -> stain densities ``[B, 3, H, W]`` (H, E, DAB); with ``clamp``
    exactly ``skimage.color.rgb2hed`` (negative densities set to 0), without it the exact inverse of
    :func:`hed_to_rgb` for every RGB value >= 1e-6."""
    m = _HED_FROM_RGB.to(rgb.device, rgb.dtype)
    od = torch.log(rgb.clamp_min(1e-6)) / _LOG_ADJUST
    hed = torch.einsum("bchw,cd->bdhw", od, m)
    return hed.clamp_min(0.0) if clamp else hed


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Stain densities ``[B, 3, H, W]`` -> RGB in ``[0, 1]``, as ``skimage.color.hed2rgb``."""
    m = _RGB_FROM_HED.to(hed.device, hed.dtype)
    log_rgb = torch.einsum("bchw,cd->bdhw", hed * _LOG_ADJUST, m)
    return torch.exp(log_rgb).clamp(0.0, 1.0)


def hed_jitter(
    rgb: torch.Tensor, sigma: float, generator: torch.Generator | None = None, shift: float | None = None
) -> torch.Tensor:
    """Tellez et al.'s HED stain augmentation of RGB ``[B, 3, H, W]`` in ``[0, 1]``: per image and stain,
    ``hed * U(1 - sigma, 1 + sigma) + U(-shift, shift)``; ``shift`` defaults to ``sigma / 5`` (densities
    are ``log(rgb) / log(1e-6)``, about 0 to 0.3 on H&E, so a shift as large as ``sigma`` tints the white
    background). The densities are not clamped at 0 before the jitter (``rgb2hed`` does), so the identity
    jitter returns the input."""
    if sigma <= 0:
        return rgb
    shift = sigma / 5 if shift is None else shift
    b = rgb.shape[0]
    alpha = 1.0 + (torch.rand(b, 3, 1, 1, generator=generator, device=rgb.device) * 2 - 1) * sigma
    beta = (torch.rand(b, 3, 1, 1, generator=generator, device=rgb.device) * 2 - 1) * shift
    return hed_to_rgb(rgb_to_hed(rgb, clamp=False) * alpha.to(rgb.dtype) + beta.to(rgb.dtype))


def dihedral(k: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """``[B, 2, 2]`` matrices: a flip of the first axis (where ``flip``) followed by ``k`` quarter turns."""
    c = torch.cos(k * (math.pi / 2)).round()
    s = torch.sin(k * (math.pi / 2)).round()
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    f = torch.ones_like(k)
    f = torch.where(flip, -f, f)
    mirror = torch.diag_embed(torch.stack([f, torch.ones_like(f)], -1))
    return rot @ mirror


def random_views(
    tiles: torch.Tensor,
    size: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """One random resized crop + flip + quarter turn per tile, as a single batched ``grid_sample``.

    Args:
        tiles: ``[B, 3, S, S]`` uint8 or float in ``[0, 1]``.
        size: output side.
        scale: range of the crop's area as a fraction of the tile; ratio: range of its aspect ratio.

    Returns:
        ``[B, 3, size, size]`` float in ``[0, 1]``.
    """
    x = tiles.float() / 255.0 if tiles.dtype == torch.uint8 else tiles.float()
    b, _, s, _ = x.shape
    dev = x.device
    # shrink first so that the largest crop is resampled by at most 2x (bilinear sampling would alias)
    pre = min(s, max(size, round(2 * size)))
    if pre < s:
        x = F.interpolate(x, size=(pre, pre), mode="bilinear", align_corners=False, antialias=True)
    u = torch.rand(b, 6, generator=generator, device=dev)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = torch.sqrt(area * torch.exp(logr)).clamp(max=1.0)  # crop side as a fraction of the tile
    h = torch.sqrt(area / torch.exp(logr)).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)  # centre in normalised [-1, 1] coordinates, crop inside the tile
    cy = (1 - h) * (2 * u[:, 3] - 1)
    k = torch.floor(u[:, 4] * 4).clamp(max=3)
    d = dihedral(k, u[:, 5] < 0.5)
    theta = torch.cat([torch.diag_embed(torch.stack([w, h], -1)) @ d, torch.stack([cx, cy], -1)[..., None]], -1)
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def pretrain_encoder(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    params: PretrainParams | None = None,
    slide_dir: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Pretrain the built-in CNN on the tiles of ``inputs`` (tile h5 files or folders); returns the
    checkpoint path (``out_dir/encoder.pt``).

    Steps: read the tile sets; build the encoder, its projector and the optimiser; train (two stain-jittered views
    per tile, InfoNCE); write ``metrics.csv``, ``curves.png`` and ``encoder.pt``.
    """
    from medcl.core.device import resolve_device, torch_threads
    from medcl.core.record import RunRecord
    from medcl.core.runfolder import RunFolder, prepare_run_folder

    t0 = time.perf_counter()
    prepare_run_folder(out_dir, "mil-encoder", overwrite=overwrite, inputs=inputs)
    p = params or PretrainParams()
    p.validate()
    dev = resolve_device(p.device)
    sets = _tile_sets(inputs, slide_dir)
    folder = RunFolder(out_dir, RunRecord(kind="mil-encoder", config=asdict(p),
                                          cases_seen=sorted({s.slide_id for s in sets})))
    folder.begin(p)
    out = Path(out_dir)
    with torch_threads(p.threads):
        torch.manual_seed(p.seed)
        stains = _fit_stains(sets, p.stain_fit_tiles, dev) if p.stain == "macenko" else None
        encoder, projector, rows, n_tiles = _train(p, sets, dev, progress, stains)
        path = _write_outputs(p, folder.record, sets, encoder, projector, rows, out)
    last = rows[-1]
    folder.finish({"steps": p.steps, "tiles": n_tiles, "slides": len(sets), "loss_first": rows[0]["loss"],
                   "loss_last": last["loss"], "pos_cosine": last["pos_cosine"], "neg_cosine": last["neg_cosine"],
                   "seconds": round(time.perf_counter() - t0, 1), "encoder": str(path)}, step=p.steps)
    log.info(
        f"pretrained the patch encoder for {p.steps} steps on {n_tiles} tiles of {len(sets)} slides: "
        f"loss {rows[0]['loss']:.3f} -> {last['loss']:.3f}, positive cosine {last['pos_cosine']:.2f}, "
        f"negative cosine {last['neg_cosine']:.2f}; wrote {path}"
    )
    return path


def _tile_sets(inputs: Sequence[str | os.PathLike], slide_dir: str | os.PathLike | None) -> list:
    """The non-empty tile sets of ``inputs``."""
    from medcl.wsi.tile_io import find_h5, load_tile_set

    files = find_h5(inputs)
    if not files:
        raise MedclDataError(", ".join(map(str, inputs)), "no tile files (.h5) found")
    sets = [s for s in (load_tile_set(f, slide_dir=slide_dir) for f in files) if len(s.coords)]
    if sum(len(s.coords) for s in sets) < 2:
        raise MedclDataError(files[0], "contrastive pretraining needs at least 2 tiles")
    return sets


def _fit_stains(sets: list, k: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One Macenko fit per slide: stain matrices ``[S, 3, 2]`` and maximum concentrations ``[S, 2]`` on ``dev``."""
    from medcl.wsi.extract import TileDataset
    from medcl.wsi.stain import fit_tiles

    fits = []
    for s in sets:
        ds = TileDataset([s], max_open=1)
        try:
            fits.append(fit_tiles(ds.read, len(ds), k))
        except MedclDataError as exc:
            raise MedclDataError(s.path, f"Macenko stain fit failed: {exc.problem}") from exc
        finally:
            ds.close()
        log.info("%s: Macenko stain matrix %s", s.slide_id, fits[-1].stain_matrix.round(3).tolist())
    he = torch.stack([torch.as_tensor(f.stain_matrix, dtype=torch.float32) for f in fits]).to(dev)
    max_c = torch.stack([torch.as_tensor(f.max_conc, dtype=torch.float32) for f in fits]).to(dev)
    return he, max_c


def _train(p: PretrainParams, sets: list, dev: torch.device, progress: bool,
           stains: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[nn.Module, nn.Module, list[dict], int]:
    """SimCLR-style training of the built-in CNN; returns (encoder, projector, metric rows, number of tiles).
    ``stains``: per-slide Macenko fits (:func:`_fit_stains`) applied to every tile before its views."""
    from torch.utils.data import RandomSampler
    from tqdm.auto import tqdm

    from medcl.engine.schedules import lr_schedule, make_lr_scheduler
    from medcl.losses.contrastive import gr_masks, info_nce
    from medcl.wsi.encoders import build_builtin
    from medcl.wsi.extract import TileDataset, tile_loader

    ds = TileDataset(sets)
    encoder = build_builtin(p.width, seed=p.seed).to(dev)
    projector = nn.Sequential(
        nn.Linear(encoder.dim, encoder.dim), nn.ReLU(inplace=True), nn.Linear(encoder.dim, p.proj_dim)
    ).to(dev)
    params_all = list(encoder.parameters()) + list(projector.parameters())
    opt = torch.optim.AdamW(params_all, lr=p.lr, weight_decay=p.weight_decay)
    sched = make_lr_scheduler(opt, lr_schedule(p.steps, "cosine", warmup=p.lr_warmup_steps))
    g_data = torch.Generator().manual_seed(p.seed)
    g_aug = torch.Generator(device=dev).manual_seed(p.seed + 1)
    sampler = RandomSampler(ds, replacement=True, num_samples=p.steps * p.batch_size, generator=g_data)
    loader = tile_loader(ds, p.batch_size, p.workers, dev, sampler=sampler, drop_last=True)

    b = p.batch_size
    src = torch.arange(b, device=dev).repeat(2)
    uid = torch.arange(2 * b, device=dev)
    pos, excl = gr_masks(src, uid, src, uid)
    rows: list[dict] = []
    encoder.train()
    projector.train()
    t0 = time.perf_counter()
    bar = tqdm(total=p.steps, desc="pretrain-encoder", unit="step", disable=not progress, file=sys.stderr)
    offsets = torch.as_tensor(ds.offsets, device=dev)
    for step, batch in enumerate(loader, start=1):
        x = batch["image"].to(dev, non_blocking=True)
        if stains is not None:
            from medcl.wsi.stain import normalize_macenko

            k = torch.searchsorted(offsets, batch["index"].to(dev), right=True) - 1  # slide of each tile
            x = normalize_macenko(x, stains[0][k], stains[1][k])
        views = torch.cat([random_views(x, p.crop, g_aug, (p.scale_min, 1.0)) for _ in range(2)])
        views = hed_jitter(views, p.stain_sigma, g_aug)
        z = projector(encoder.model((views - encoder.mean) / encoder.std))
        res = info_nce(z, z, pos, excl, temperature=p.temperature, mode="per_pair")
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        if step % p.log_every == 0 or step == p.steps:
            with torch.no_grad():
                zn = F.normalize(z.detach().float(), dim=1)
                sim = zn @ zn.T
                row = {
                    "step": step,
                    "loss": float(res.loss.detach()),
                    "pos_cosine": float(sim[pos].mean()),
                    "neg_cosine": float(sim[~pos & ~excl].mean()),
                    "lr": float(sched.get_last_lr()[0]),
                    "seconds": time.perf_counter() - t0,
                }
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    bar.close()
    n_tiles = len(ds)
    ds.close()
    return encoder, projector, rows, n_tiles


def _write_outputs(p: PretrainParams, record: dict, sets: list, encoder: nn.Module, projector: nn.Module,
                   rows: list[dict], out: Path) -> Path:
    """``metrics.csv``, ``curves.png`` and ``encoder.pt`` (with the run record); returns the checkpoint path."""
    from medcl.core.files import write_csv
    from medcl.engine.checkpoint import atomic_torch_save
    from medcl.engine.plots import plot_curves
    from medcl.wsi.encoders import encoder_checkpoint

    write_csv(out / "metrics.csv", rows)
    plot_curves(out / "metrics.csv", out / "curves.png", keys=["loss", "pos_cosine", "neg_cosine"],
                title="patch encoder pretraining (SimCLR, HED stain jitter)")
    encoder.eval()
    encoder.input_size = p.crop  # extraction sees tiles at the view size it was trained at
    ckpt = encoder_checkpoint(
        encoder,
        p.width,
        record={**record, "complete": True, "step": p.steps},
        extra={"projector": {k: v.detach().cpu() for k, v in projector.state_dict().items()},
               "tiles_mpp": float(sets[0].attrs.get("mpp", 0.0)), "tile_size": sets[0].tile_size},
    )
    path = out / "encoder.pt"
    atomic_torch_save(ckpt, path)
    return path
