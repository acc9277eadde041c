import numpy as np
import pytest
import torch

from medcl.config import apply_overrides, from_dict
from medcl.core.errors import MedclConfigError, MedclDataError
from medcl.core.geometry import affine_from_itk, lps_to_ras, orientation_from_affine, spacing_from_affine
from medcl.core.provenance import ViewBatch
from medcl.core.record import RunRecord


def test_geometry_helpers():
    aff = np.diag([-2.0, 1.5, 3.0, 1.0])
    assert np.allclose(spacing_from_affine(aff), [2.0, 1.5, 3.0])
    assert orientation_from_affine(aff) == "LAS"
    assert np.allclose(lps_to_ras(lps_to_ras(aff)), aff)
    # ITK identity direction = LPS axes -> RAS affine has negated x and y columns
    ras = affine_from_itk([1, 2, 3], [0.5, 0.5, 2.0], np.eye(3).ravel())
    assert orientation_from_affine(ras) == "LPS"
    assert np.allclose(ras[:3, 3], [-1, -2, 3])


def test_viewbatch_correspondence_and_cat():
    n = 3
    aff = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    aff[1, :3, 3] = torch.tensor([2.0, 0.0, 0.0])
    vb = ViewBatch(torch.zeros(n, 1, 4, 4, 4), torch.arange(n), -torch.ones(n, dtype=torch.long), aff, aff.clone())
    m = vb.correspondence(0, 1)
    p = m @ torch.tensor([5.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(p[:3], torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64))
    both = ViewBatch.cat([vb, vb.select([0])])
    assert len(both) == 4 and both.source_id.tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="affine"):
        ViewBatch(torch.zeros(2, 1, 2, 2, 2), torch.arange(2), torch.arange(2), torch.eye(4), torch.eye(4))


def test_errors_name_what():
    e = MedclDataError("/x/a.nii.gz", "not 3D")
    assert "/x/a.nii.gz" in str(e) and "not 3D" in str(e)
    assert "train.lr" in str(MedclConfigError("train.lr", "expected a number"))


def test_run_record_roundtrip():
    r = RunRecord(kind="pretrain", config={"a": 1}, cases_seen=["c1"], extra={"probe_cases": ["p1"]})
    d = r.to_dict()
    assert d["version"] == 2 and d["environment"]["python"] and d["complete"] is False and d["step"] == 0
    back = RunRecord.from_dict(d)
    assert back.cases_seen == ["c1"] and back.extra == {"probe_cases": ["p1"]} and back.complete is False
    # a version-1 record (before complete / step / extra): unknown keys land in extra, completeness is unknown
    old = {"kind": "pretrain", "cases_seen": ["c1"], "probe_cases": ["p2"], "data": "/d", "version": 1}
    v1 = RunRecord.from_dict(old)
    assert v1.extra == {"probe_cases": ["p2"], "data": "/d"} and v1.complete is None
    d["version"] = 99
    with pytest.raises(MedclDataError, match="newer"):
        RunRecord.from_dict(d)


def test_config_validation():
    from dataclasses import dataclass, field

    @dataclass
    class Opt:
        lr: float = 1e-3
        steps: int = 10

    @dataclass
    class Cfg:
        name: str = "x"
        opt: Opt = field(default_factory=Opt)
        sizes: list[int] = field(default_factory=lambda: [1, 2])

    c = from_dict(Cfg, apply_overrides({"opt": {"lr": "1e-4"}}, ["opt.steps=5", "sizes=[3]"]))
    assert c.opt.lr == 1e-4 and c.opt.steps == 5 and c.sizes == [3]
    with pytest.raises(MedclConfigError, match="opt.lrr"):
        from_dict(Cfg, {"opt": {"lrr": 1}})
    Opt.RENAMED = {"rate": "renamed: use opt.lr"}  # a schema names the keys it renamed
    with pytest.raises(MedclConfigError, match=r"config key 'opt.rate': renamed: use opt.lr"):
        from_dict(Cfg, {"opt": {"rate": 1}})
    with pytest.raises(MedclConfigError, match="opt.steps"):
        from_dict(Cfg, {"opt": {"steps": "many"}})


def test_errors_survive_pickling_across_processes():
    """A benchmark fine-tune runs in a worker process: its error must reach the parent as itself (not as a
    BrokenProcessPool from an exception that cannot be rebuilt)."""
    import pickle

    from medcl.core.errors import MedclInterrupted

    for err in (MedclConfigError("optim.lr", "must be > 0"), MedclDataError("/x/y.nii.gz", "not a volume"),
                MedclDataError(None, "no path"), MedclInterrupted("SIGTERM", 7, "/runs/a")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)
