"""The FusionReport schema and renderings, on small hand-made models.

The expected names and counts are worked out here from the models themselves
(which modules are norms, how many elements their tensors hold), not read back
from the report, so that a report that drops, doubles or miscounts a norm fails.
"""
import json
from html.parser import HTMLParser

import pytest
import torch
from torch import nn

from fusion import REASONS, FusionReport, analyze, fuse
from fusion.report import SCHEMA_VERSION, FusedPair, LeftNorm


class Mixed(nn.Module):
    """One norm of each kind the report must account for."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(4)  # fused after conv_a (bias added)
        self.bn_relu = nn.BatchNorm2d(4)  # after a ReLU: folds forward into conv_b
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.bn_batch = nn.BatchNorm2d(4, track_running_stats=False)  # batch_statistics
        self.conv_c = nn.Conv2d(4, 4, 1)
        self.inorm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)  # unknown
        self.conv_d = nn.Conv2d(4, 4, 1)
        self.bn_hook = nn.BatchNorm2d(4)  # has_hooks
        self.bn_hook.register_forward_hook(lambda module, args, out: None)
        self.conv_r = nn.Conv2d(4, 4, 1)
        self.bn_r = nn.BatchNorm2d(4)  # producer_output_reused (residual)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)  # needs_example_inputs without them

    def forward(self, x):
        x = self.bn_relu(torch.relu(self.bn_a(self.conv_a(x))))
        x = self.bn_batch(self.conv_b(x))
        x = self.inorm(self.conv_c(x))
        x = self.bn_hook(self.conv_d(x))
        r = self.conv_r(x)
        x = self.bn_r(r) + r
        return self.bn_fc(self.fc(x.mean(dim=(2, 3))))


NORMS = ["bn_a", "bn_relu", "bn_batch", "inorm", "bn_hook", "bn_r", "bn_fc"]


def _randomise(model, seed=0):
    """Non-trivial statistics and affine values, so that a fold changes numbers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(c, generator=gen))
                    m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=gen))
    return model.eval()


def _mixed():
    torch.manual_seed(0)
    return _randomise(Mixed())


def _chain():
    """Every norm foldable: conv-bn-relu-conv-bn."""
    torch.manual_seed(0)
    return _randomise(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)))


def _norm_names(model):
    """The norms, found independently of fusion's own notion of a norm."""
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, nn.modules.batchnorm._NormBase))


def _x():
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


# --- to_dict / to_json ----------------------------------------------------------------


def test_to_dict_has_the_documented_keys_and_types():
    d = analyze(_mixed()).to_dict()
    assert set(d) == {"schema_version", "dry_run", "evidence", "fused", "left", "removed",
                      "added", "parameters_reduced", "verification", "notes", "plan"}
    assert d["schema_version"] == SCHEMA_VERSION and isinstance(d["schema_version"], int)
    assert d["dry_run"] is True
    assert isinstance(d["evidence"], list) and all(isinstance(e, str) for e in d["evidence"])
    assert isinstance(d["notes"], list)
    for pair in d["fused"]:
        assert set(pair) == {"norm", "layer", "direction", "evidence", "bias_added",
                             "untied", "replaced_by", "channels"}
        assert pair["direction"] in ("after", "before")
        assert isinstance(pair["bias_added"], bool) and isinstance(pair["untied"], bool)
        assert pair["replaced_by"] == "Identity" and pair["channels"] is None
    for left in d["left"]:
        assert set(left) == {"norm", "reason", "detail"}
        assert left["reason"] in REASONS, left
        assert isinstance(left["detail"], str) and left["detail"]
    assert set(d["removed"]) == {"parameters", "buffers", "parameter_count",
                                 "buffer_count"}
    assert set(d["added"]) == {"parameters", "parameter_count"}
    for group in (d["removed"]["parameters"], d["removed"]["buffers"],
                  d["added"]["parameters"]):
        assert all(isinstance(k, str) and type(v) is int for k, v in group.items())
    assert d["removed"]["parameter_count"] == sum(d["removed"]["parameters"].values())
    assert d["removed"]["buffer_count"] == sum(d["removed"]["buffers"].values())
    assert d["added"]["parameter_count"] == sum(d["added"]["parameters"].values())
    assert type(d["parameters_reduced"]) is int
    assert d["verification"] is None  # nothing was run
    assert set(d["plan"]) >= {"version", "folds", "replaced"}


def test_to_json_round_trips():
    _, report = fuse(_mixed(), example_inputs=_x(), return_report=True)
    text = report.to_json()
    assert json.loads(text) == report.to_dict()
    assert json.loads(report.to_json(indent=None)) == report.to_dict()
    assert "\n" not in report.to_json(indent=None)


def test_verification_is_filled_when_verified():
    _, report = fuse(_chain(), example_inputs=_x(), return_report=True)
    v = report.to_dict()["verification"]
    assert set(v) == {"rel_err", "max_abs_err", "tolerance", "compared", "why"}
    assert all(isinstance(v[k], float) for k in ("rel_err", "max_abs_err", "tolerance"))
    assert v["compared"] == "outputs" and v["why"] is None
    assert 0 <= v["rel_err"] <= v["tolerance"]
    assert v["max_abs_err"] >= 0


# --- accounting -------------------------------------------------------------------------


@pytest.mark.parametrize("inputs", [None, "x"])
def test_every_norm_appears_exactly_once(inputs):
    model = _mixed()
    report = analyze(model, example_inputs=_x() if inputs else None)
    named = [p.norm for p in report.fused] + [n.norm for n in report.left]
    assert sorted(named) == _norm_names(model) == sorted(NORMS)
    reasons = {n.norm: n.reason for n in report.left}
    assert reasons["bn_batch"] == "batch_statistics"
    assert reasons["inorm"] == "unknown_norm"
    assert reasons["bn_hook"] == "has_hooks"
    assert reasons["bn_r"] == "producer_output_reused"
    # BatchNorm1d after Linear folds only with a recorded run to prove 2-D input.
    if inputs:
        assert "bn_fc" in {p.norm for p in report.fused}
    else:
        assert reasons["bn_fc"] == "needs_example_inputs"


def test_counts_match_the_fused_model():
    model = _mixed()
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    fused, report = fuse(model, example_inputs=_x(), return_report=True)
    assert report.parameters_reduced == params - sum(p.numel() for p in fused.parameters())
    assert report.buffers_removed == buffers - sum(b.numel() for b in fused.buffers())
    # Exactly the fused norms' own tensors are removed.
    expected = {f"{p.norm}.{n}" for p in report.fused for n in ("weight", "bias")}
    assert set(report.removed_parameters) == expected
    # conv_a had no bias: the fold gives it one, and the report says so.
    assert report.added_parameters == {"conv_a.bias": 4}
    assert [p.bias_added for p in report.fused if p.layer == "conv_a"] == [True]


def test_analyze_is_a_dry_run_that_changes_nothing():
    model = _mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = analyze(model)
    assert report.dry_run and report.to_dict()["dry_run"] is True
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.bn_a, nn.BatchNorm2d)
    assert "to remove" in str(report) and "would fuse" in str(report)


def test_plan_names_the_folds_of_the_report():
    _, report = fuse(_mixed(), example_inputs=_x(), return_report=True)
    plan = json.loads(json.dumps(report.plan))
    by_layer = {f["layer"]: f for f in plan["folds"]}
    for pair in report.fused:
        assert by_layer[pair.layer][pair.direction] == pair.norm
    assert sorted(plan["replaced"]) == sorted(p.norm for p in report.fused)


def test_an_already_fused_model_has_nothing_to_do():
    once = fuse(_chain())
    twice, report = fuse(once, return_report=True)
    assert report.nothing_to_do
    d = report.to_dict()
    assert d["fused"] == [] and d["left"] == []
    assert d["parameters_reduced"] == 0 and d["removed"]["buffer_count"] == 0
    assert any("nothing to do" in n for n in d["notes"])
    assert str(report).startswith("FusionReport: Nothing to fuse")
    assert analyze(once).nothing_to_do


def test_an_already_fused_model_has_no_spurious_notes():
    # The Identity that replaced each norm must be in eval mode too, or fusing the
    # fused model would note that it "was in training mode".
    once = fuse(_chain())
    assert not any(m.training for m in once.modules())
    _, report = fuse(once, return_report=True)
    assert not any("training mode" in n for n in report.notes)


# --- str and HTML ------------------------------------------------------------------------


def _table(text):
    """The table's rows (after the dashes line), and the column starts."""
    lines = text.splitlines()
    dash = next(i for i, line in enumerate(lines) if line.strip().startswith("------"))
    starts = [i for i, ch in enumerate(lines[dash]) if ch == "-" and
              (i == 0 or lines[dash][i - 1] == " ")]
    rows = [line for line in lines[dash + 1:] if not line.startswith("note:")]
    return lines[dash - 1], rows, starts


def test_str_is_an_aligned_table_naming_every_norm():
    report = analyze(_mixed())
    text = str(report)
    header, rows, starts = _table(text)
    assert header.split() == ["status", "norm", "layer", "/", "reason", "detail"]
    assert len(starts) == 4 and len(rows) == len(NORMS)
    for row in rows + [header]:
        for col in starts:
            # Each cell starts exactly at its column, after at least one space.
            assert row[col] != " " and row[col - 1] == " ", (row, col)
    assert sorted(row[starts[1]:starts[2]].strip() for row in rows) == sorted(NORMS)
    for left in report.left:
        line = next(r for r in rows if r[starts[1]:starts[2]].strip() == left.norm)
        assert line[starts[0]:].startswith("left")
        assert line[starts[2]:starts[3]].strip() == left.reason


class _Cells(HTMLParser):
    """The text of each table cell, row by row (markup inside a cell included)."""

    def __init__(self):
        super().__init__()
        self.rows, self.tags, self._row, self._cell = [], [], None, None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_repr_html_lists_the_left_norms_then_the_fused_ones():
    report = analyze(_mixed())
    page = _Cells()
    page.feed(report._repr_html_())
    assert "details" in page.tags and "script" not in page.tags
    heads = [i for i, r in enumerate(page.rows) if r[0] == "norm" and r[1] in
             ("reason", "layer")]
    assert [page.rows[i] for i in heads] == [["norm", "reason", "detail"],
                                             ["norm", "layer", "how"]]
    left, fused = page.rows[heads[0] + 1:heads[1]], page.rows[heads[1] + 1:]
    assert sorted(r[0] for r in left + fused) == sorted(NORMS)
    assert {(r[0], r[1]) for r in left} == {(n.norm, n.reason) for n in report.left}
    assert {(r[0], r[1]) for r in fused} == {(p.norm, p.layer) for p in report.fused}


def test_repr_html_escapes_text():
    report = FusionReport(left=[LeftNorm("a.bn", "unknown_norm", "class <Evil>")],
                          notes=["<script>alert(1)</script>"])
    page = _Cells()
    page.feed(report._repr_html_())
    assert "script" not in page.tags
    assert "&lt;script&gt;" in report._repr_html_()
    assert page.rows[1] == ["a.bn", "unknown_norm", "class <Evil>"]


def test_hand_made_report_renders():
    report = FusionReport(fused=[FusedPair("bn", "conv", "after", "fx", bias_added=True)],
                          removed_parameters={"bn.weight": 3, "bn.bias": 3},
                          added_parameters={"conv.bias": 3})
    assert report.parameters_reduced == 3
    text = str(report)
    assert "bias added" in text and "conv" in text
    assert repr(report).startswith("<FusionReport fused 1 norm(s), left 0")
    empty = FusionReport()
    assert empty.nothing_to_do and "Nothing to fuse" in str(empty)
